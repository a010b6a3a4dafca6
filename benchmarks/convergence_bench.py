"""CheckFree convergence experiment (spec section 7 item 9): final validation loss per recovery method.

    python benchmarks/convergence_bench.py [--seeds 3] [--iters 240] [--workers 2] [--replot]

Simulation, stated plainly: one process trains the ring model (home stage = embedding + head, which
never fails; L body stages of one decoder block each) sequentially, and failures are simulated
*in-process at iteration boundaries*: the lost stage's weights and optimizer state are replaced by
what each arm's rule produces. Real multi-process recovery (SIGKILL, regroup, transfer, replay) is
exercised by the tests and ``benchmarks/recovery_bench.py``; here only the math of each rule and its
effect on convergence is compared. The recovery rules are the library's own
(:mod:`integration.recovery.rebuild`): ``checkfree_average``, ``partner_copy``, ``stage_weight``,
``fresh_optimizer_state``, ``set_lr_scale``.

Every arm of a seed sees the same failure schedule (iteration, stage), drawn from the seed; one
failure per iteration at most (adjacent losses are the fallback's business, see the tests). Every
arm gets the same compute budget of ``--iters`` executed iterations: the checkpoint arm's rolled-back
iterations count against it, so it ends at an earlier global step (equal wall-clock, as in the
paper's comparison). Wall-clock: measured training + recovery time (no validation); the figure's
left panel scales executed iterations by the median measured iteration time of all runs (robust
to other jobs on shared cores), the right panel shows the raw measurement.

Arms: no_failure; checkfree (gradient-weighted average of the neighbours; an edge stage, which
CheckFree cannot average, copies its body neighbour - the named degraded mode); uniform (plain
mean); copy (copy a body neighbour); random_init (fresh proper init, new seed); checkpoint
(whole model + optimizers every K iterations, full rollback on a failure); stale_restore (only the
failed stage from the last K-snapshot, weights and its optimizer state); checkfree_plus (swaps
S1<->S2 and S_{L-1}<->S_L on odd microbatches, edges copied from the partner); checkfree_plus
without failures. Rebuilt stages get fresh Adam state and ``lr_scale`` (CheckFree arms, copy,
random_init, uniform); restores (checkpoint, stale) bring their optimizer state back, no scale.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from integration.models.llama import DecoderBlock, HomeStage, LlamaConfig, lm_loss  # noqa: E402
from integration.recovery import rebuild as rb  # noqa: E402

ARMS = ("no_failure", "checkfree", "uniform", "copy", "random_init", "checkpoint", "stale_restore",
        "checkfree_plus", "checkfree_plus_no_failure")
FAILING = {a for a in ARMS if not a.endswith("no_failure")}
SWAPS = {"checkfree_plus", "checkfree_plus_no_failure"}


@dataclass
class Setup:
    iters: int = 240
    body_stages: int = 6
    d_model: int = 64
    n_heads: int = 4
    seq_len: int = 64
    micro_batch_size: int = 4
    microbatches: int = 4          # even: CheckFree+ swaps odd microbatches
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    grad_clip: float = 1.0
    lr_scale: float = 1.1
    failures: int = 8              # per run, at distinct iterations in the middle 80 %
    checkpoint_every: int = 40
    eval_every: int = 20
    val_microbatches: int = 4
    final_val_microbatches: int = 16


@dataclass
class Curve:
    arm: str
    seed: int
    points: list[tuple[float, int, int, float]] = field(default_factory=list)  # wall s, executed, global step, val
    final_val: float = float("nan")
    rollback_iters: int = 0


def failure_schedule(setup: Setup, seed: int) -> dict[int, int]:
    """iteration -> body stage (1..L) that fails at that iteration's start; one per iteration."""
    rng = random.Random(10_000 + seed)
    lo, hi = int(setup.iters * 0.1), int(setup.iters * 0.9)
    return {t: rng.randint(1, setup.body_stages) for t in sorted(rng.sample(range(lo, hi), setup.failures))}


def lr_factor(setup: Setup, step: int) -> float:
    if step < setup.warmup:
        return (step + 1) / setup.warmup
    progress = min(1.0, (step - setup.warmup) / max(1, setup.iters - setup.warmup))
    return setup.min_lr_ratio + (1 - setup.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class RingModel:
    """Home (embedding + head) and L body stages, each with its own AdamW + schedule (per-stage surgery)."""

    def __init__(self, setup: Setup, cfg: LlamaConfig, seed: int):
        self.setup, self.cfg = setup, cfg
        self.stages: list[torch.nn.Module] = [HomeStage(cfg, seed)] + [DecoderBlock(cfg, i, seed)
                                                                        for i in range(setup.body_stages)]
        self.opts = [torch.optim.AdamW(m.parameters(), lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                       foreach=False) for m in self.stages]
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(setup, s)) for o in self.opts]
        self.grad_norms = [1.0] * len(self.stages)
        self.step = 0

    def forward(self, tokens: torch.Tensor, swapped: bool) -> torch.Tensor:
        L = self.setup.body_stages
        order = list(range(1, L + 1))
        if swapped:  # CheckFree+: E, S2, S1, S3, ..., S_{L-2}, S_L, S_{L-1}, H
            order[0], order[1] = order[1], order[0]
            order[-1], order[-2] = order[-2], order[-1]
        h = self.stages[0].embed_forward(tokens)
        for s in order:
            h = self.stages[s](h)
        return self.stages[0].head_forward(h)

    def train_step(self, batch, swaps: bool) -> float:
        M = self.setup.microbatches
        total = 0.0
        for i in range(M):
            tokens, labels = batch(self.step, i)
            loss = lm_loss(self.forward(tokens, swaps and i % 2 == 1), labels) / M
            loss.backward()
            total += loss.item()
        self.grad_norms = [rb.grad_norm(m.parameters()) for m in self.stages]
        params = [p for m in self.stages for p in m.parameters()]
        torch.nn.utils.clip_grad_norm_(params, self.setup.grad_clip)
        for o, sch in zip(self.opts, self.scheds):
            o.step()
            o.zero_grad(set_to_none=True)
            sch.step()
        self.step += 1
        return total

    @torch.no_grad()
    def val_loss(self, batch, n: int) -> float:
        total = 0.0
        for i in range(n):
            tokens, labels = batch(0, i)
            total += float(lm_loss(self.forward(tokens, False), labels))
        return total / n

    def snapshot(self) -> dict:
        return copy.deepcopy({"stages": [m.state_dict() for m in self.stages], "opts": [o.state_dict() for o in self.opts],
                              "scheds": [s.state_dict() for s in self.scheds], "step": self.step,
                              "grad_norms": list(self.grad_norms)})

    def restore(self, snap: dict, only: int | None = None) -> None:
        """Whole model (rollback) or, with ``only``, one stage's weights and optimizer state (stale restore)."""
        idx = range(len(self.stages)) if only is None else [only]
        for s in idx:
            self.stages[s].load_state_dict(snap["stages"][s])
            self.opts[s].load_state_dict(snap["opts"][s])
            if only is None:
                self.scheds[s].load_state_dict(snap["scheds"][s])
        if only is None:
            self.step = snap["step"]
            self.grad_norms = list(snap["grad_norms"])

    def rebuild(self, s: int, state: dict) -> None:
        """Load a rebuilt stage; fresh Adam state and lr_scale (set, never compounded)."""
        self.stages[s].load_state_dict(state)
        rb.fresh_optimizer_state(self.opts[s])
        rb.set_lr_scale(self.opts[s], self.setup.lr_scale)


def recover(model: RingModel, arm: str, s: int, seed: int, t: int) -> None:
    """Apply ``arm``'s rule to lost body stage ``s`` (1..L) at an iteration boundary."""
    L = model.setup.body_stages
    st = [m.state_dict() for m in model.stages]
    interior = 2 <= s <= L - 1
    neighbour = s - 1 if s > 1 else s + 1
    if arm in ("checkfree", "checkfree_plus", "uniform") and interior:
        if arm == "uniform":
            w = (1.0, 1.0)
        else:
            w = tuple(rb.stage_weight(model.grad_norms[n], "clipped_l2") for n in (s - 1, s + 1))
        model.rebuild(s, rb.checkfree_average(st[s - 1], st[s + 1], *w))
    elif arm == "checkfree_plus":  # edge: copy the swap partner
        model.rebuild(s, rb.partner_copy(st[2 if s == 1 else L - 1]))
    elif arm in ("checkfree", "uniform", "copy"):  # CheckFree edge: named degraded mode (copy a body neighbour)
        model.rebuild(s, rb.partner_copy(st[neighbour]))
    elif arm == "random_init":
        model.rebuild(s, DecoderBlock(model.cfg, s - 1, seed=1_000_000 + 97 * seed + t).state_dict())
    else:
        raise ValueError(arm)


def run_arm(arm: str, seed: int, setup: Setup, data_cfg: dict) -> Curve:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    from integration.data.dataset import build_dataset
    from omegaconf import OmegaConf

    dataset, vocab = build_dataset(OmegaConf.create(data_cfg))
    cfg = LlamaConfig(vocab_size=vocab, d_model=setup.d_model, n_heads=setup.n_heads, seq_len=setup.seq_len).validate()
    model = RingModel(setup, cfg, seed)
    M, mbs, seq = setup.microbatches, setup.micro_batch_size, setup.seq_len

    def train_batch(step: int, i: int):
        return dataset.microbatch(step, 0, i, 1, M, mbs, seq)

    def val_batch(step: int, i: int):
        return dataset.microbatch(0, 0, i, 1, setup.final_val_microbatches, mbs, seq, split="validation")

    schedule = failure_schedule(setup, seed) if arm in FAILING else {}
    pending = dict(schedule)  # failures strike at *executed* iteration t (a rollback does not undo time)
    curve = Curve(arm, seed)
    snap = model.snapshot() if arm in ("checkpoint", "stale_restore") else None
    wall = 0.0
    for executed in range(setup.iters):
        t0 = time.perf_counter()
        if executed in pending:
            s = pending.pop(executed)
            if arm == "checkpoint":
                curve.rollback_iters += model.step - snap["step"]
                model.restore(snap)
            elif arm == "stale_restore":
                model.restore(snap, only=s)
            else:
                recover(model, arm, s, seed, executed)
        model.train_step(train_batch, arm in SWAPS)
        if snap is not None and model.step % setup.checkpoint_every == 0:
            snap = model.snapshot()
        wall += time.perf_counter() - t0
        if (executed + 1) % setup.eval_every == 0:
            curve.points.append((wall, executed + 1, model.step, model.val_loss(val_batch, setup.val_microbatches)))
    curve.final_val = model.val_loss(val_batch, setup.final_val_microbatches)
    return curve


def _job(args):
    return run_arm(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=240)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--replot", action="store_true", help="only redraw the figure from the saved results")
    a = ap.parse_args()
    if a.replot:
        replot(Path(a.out) / "convergence_results.json", Path(a.out) / "convergence_loss_vs_time.png")
        return
    setup = Setup(iters=a.iters)
    data_cfg = {"source": "stdlib", "paths": [], "prefix": None, "tokenizer": "bpe", "vocab_size": 1024,
                "cache_dir": os.path.expanduser("~/.cache/skipfree/data"), "max_bytes": 8_000_000, "seed": 0,
                "val_fraction": 0.05}
    arms = a.arms.split(",")
    jobs = [(arm, seed, setup, data_cfg) for seed in range(a.seeds) for arm in arms]
    t0 = time.time()
    if a.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(a.workers) as pool:
            curves = pool.map(_job, jobs)
    else:
        curves = [_job(j) for j in jobs]
    total = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    base = statistics.mean(c.final_val for c in curves if c.arm == "no_failure") if "no_failure" in arms else None
    print(f"# {a.seeds} seeds x {len(arms)} arms, {setup.iters} iterations each, {setup.failures} failures per "
          f"failing run, L={setup.body_stages}, d={setup.d_model}; {total:.0f} s total")
    print("| arm | final val loss (mean ± std) | vs no failure | global steps reached | rolled-back iters |")
    print("|---|---|---|---|---|")
    for arm in arms:
        cs = [c for c in curves if c.arm == arm]
        vals = [c.final_val for c in cs]
        mean, std = statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
        rel = f"{100 * (mean - base) / base:+.1f} %" if base else "-"
        steps = statistics.mean(c.points[-1][2] for c in cs)
        rolled = statistics.mean(c.rollback_iters for c in cs)
        rows.append({"arm": arm, "mean": mean, "std": std, "vals": vals, "steps": steps, "rolled_back": rolled})
        print(f"| {arm} | {mean:.4f} ± {std:.4f} | {rel} | {steps:.0f} | {rolled:.0f} |")
    (out / "convergence_results.json").write_text(json.dumps(
        {"setup": setup.__dict__, "seeds": a.seeds, "total_s": total, "rows": rows,
         "schedules": {s: failure_schedule(setup, s) for s in range(a.seeds)},
         "curves": [c.__dict__ for c in curves]}, indent=1))
    _plot(curves, arms, out / "convergence_loss_vs_time.png")


def _plot(curves: list[Curve], arms: list[str], path: Path) -> None:
    """Two panels: loss vs wall-clock at the median measured iteration time, and vs raw measured time.

    The raw measurement on shared cores is distorted by other jobs (a starved stretch shifts a whole
    curve), so the left panel scales executed iterations (rolled-back ones counted) by the median
    measured iteration time over all runs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def median_iteration_s(c: Curve) -> float:
        walls = [0.0] + [p[0] for p in c.points]
        execs = [0] + [p[1] for p in c.points]
        return float(np.median([(walls[i + 1] - walls[i]) / (execs[i + 1] - execs[i]) for i in range(len(c.points))]))

    # One iteration time for every arm: in-process recovery costs next to nothing here, so equal
    # executed iterations are equal wall-clock; contention from other jobs is not the arms' doing.
    t_iter = float(np.median([median_iteration_s(c) for c in curves]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for arm in arms:
        cs = [c for c in curves if c.arm == arm]
        n = min(len(c.points) for c in cs)
        val = np.array([[p[3] for p in c.points[:n]] for c in cs])
        raw = np.mean([[p[0] for p in c.points[:n]] for c in cs], axis=0)
        est = np.array([p[1] for p in cs[0].points[:n]]) * t_iter
        style = "--" if arm.endswith("no_failure") else "-"
        for ax, x in zip(axes, (est, raw)):
            ax.plot(x, val.mean(0), style, label=arm)
            ax.fill_between(x, val.min(0), val.max(0), alpha=0.10)
    axes[0].set_xlabel(f"wall-clock (s) = executed iterations x {t_iter:.3f} s (median measured iteration)")
    axes[1].set_xlabel("raw measured wall-clock (s; shared cores, other jobs running)")
    axes[0].set_ylabel("validation loss (full model, in order)")
    fig.suptitle("CheckFree convergence: same failure schedule in every arm; mean over seeds, band = min-max")
    for ax in axes:
        ax.set_ylim(top=min(ax.get_ylim()[1], 7.0))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(results: Path, path: Path) -> None:
    """Redraw the figure from a saved ``convergence_results.json``."""
    data = json.loads(results.read_text())
    curves = [Curve(c["arm"], c["seed"], [tuple(p) for p in c["points"]], c["final_val"], c["rollback_iters"])
              for c in data["curves"]]
    _plot(curves, [r["arm"] for r in data["rows"]], path)


if __name__ == "__main__":
    main()
