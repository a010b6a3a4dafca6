"""What crosses a stage boundary, and one handshake so both sides of every transfer agree on it.

A boundary payload is a nested structure (tensor, tuple, list, dict, None) flattened into a list of
tensors plus a :class:`BoundaryLayout` (the structure and every tensor's shape and dtype). Float
tensors carry gradients back along the route, integer/bool ones (tokens, labels, masks) do not.
The single-tensor activation path of :class:`~integration.runtime.p2p.RoutedP2P` stays as it is; a
payload travels as one header-checked message of its tensors' bytes, packed 8-byte aligned (its
size is checked on arrival; the handshake has already agreed on the layout).

:func:`handshake` runs once per plan, before the first transfer: every rank publishes what it will
send to whom and what it expects from whom, all ranks check every pair with the same data, and a
mismatch (a layout or model that differs between stages) becomes the same clear error on every
rank, instead of a gloo size abort or silently misread bytes mid-iteration.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from .p2p import RoutedP2P, TensorSpec, launch

# A structure node: ("T", i) leaf tensor i; ("N",) None; ("tuple"|"list", [nodes]); ("dict", [(key, node)]).
Structure = tuple


@dataclass(frozen=True)
class BoundaryLayout:
    """The structure of a payload and the spec of each of its flattened tensors (in order)."""

    structure: Structure
    specs: tuple[TensorSpec, ...]

    @property
    def carries_grad(self) -> tuple[bool, ...]:
        """Per flattened tensor: whether it is floating point (gradients flow back through it)."""
        return tuple(s.dtype.is_floating_point for s in self.specs)

    def describe(self) -> str:
        """Readable form, e.g. ``{tokens: int64[2, 8], attention_mask: None}``."""
        return _describe(self.structure, self.specs)

    def key(self) -> tuple:
        """A picklable, comparable form (torch dtypes as strings)."""
        return (self.structure, tuple((tuple(s.shape), str(s.dtype)) for s in self.specs))

    @staticmethod
    def from_key(key: tuple) -> "BoundaryLayout":
        structure, specs = key
        return BoundaryLayout(structure, tuple(TensorSpec(tuple(shape), getattr(torch, dt.split(".")[-1]))
                                               for shape, dt in specs))


def single(spec: TensorSpec) -> BoundaryLayout:
    """The layout of a payload that is one tensor."""
    return BoundaryLayout(("T", 0), (spec,))


def grad_layout(layout: BoundaryLayout) -> BoundaryLayout:
    """The layout of the gradients that flow back through ``layout``: a list, one per float tensor."""
    floats = tuple(s for s in layout.specs if s.dtype.is_floating_point)
    return BoundaryLayout(("list", tuple(("T", i) for i in range(len(floats)))), floats)


def flatten(obj: Any) -> tuple[list[torch.Tensor], BoundaryLayout]:
    """Flatten a nested payload into its tensors (depth first, dict keys in insertion order)."""
    tensors: list[torch.Tensor] = []

    def walk(x: Any) -> Structure:
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return ("T", len(tensors) - 1)
        if x is None:
            return ("N",)
        if isinstance(x, (tuple, list)):
            return ("tuple" if isinstance(x, tuple) else "list", tuple(walk(v) for v in x))
        if isinstance(x, Mapping):
            for k in x:
                if not isinstance(k, (str, int)):
                    raise TypeError(f"boundary payload: dict key {k!r} is not a str or int")
            return ("dict", tuple((k, walk(v)) for k, v in x.items()))
        raise TypeError(f"boundary payload: cannot send a {type(x).__name__} (tensors, tuples, lists, dicts, None)")

    structure = walk(obj)
    return tensors, BoundaryLayout(structure, tuple(TensorSpec(tuple(t.shape), t.dtype) for t in tensors))


def unflatten(tensors: list[torch.Tensor], layout: BoundaryLayout) -> Any:
    """Rebuild the payload described by ``layout`` from its flattened tensors."""
    if len(tensors) != len(layout.specs):
        raise ValueError(f"boundary payload: {len(tensors)} tensors for a layout of {len(layout.specs)}")

    def build(node: Structure) -> Any:
        tag = node[0]
        if tag == "T":
            return tensors[node[1]]
        if tag == "N":
            return None
        if tag in ("tuple", "list"):
            items = [build(n) for n in node[1]]
            return tuple(items) if tag == "tuple" else items
        return {k: build(n) for k, n in node[1]}

    return build(layout.structure)


_ALIGN = 8  # every tensor starts 8-byte aligned inside a packed payload (viewable as any dtype)


def _nbytes(spec: TensorSpec) -> int:
    n = torch.Size(spec.shape).numel() * torch.empty((), dtype=spec.dtype).element_size()
    return n + (-n) % _ALIGN


def send_payload(p2p: RoutedP2P, tensors: list[torch.Tensor], peer: int, kind: str, mb: int, step: int) -> None:
    """Send a flattened payload as ONE header-checked message (its tensors' bytes, packed)."""
    chunks = []
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        chunks.append(raw)
        if raw.numel() % _ALIGN:
            chunks.append(torch.zeros((-raw.numel()) % _ALIGN, dtype=torch.uint8, device=raw.device))
    packed = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    p2p.send(packed, peer, kind, mb, step)


def recv_payload(p2p: RoutedP2P, layout: BoundaryLayout, peer: int, kind: str, mb: int, step: int
                 ) -> list[torch.Tensor]:
    """Receive the tensors of a payload of ``layout`` (views into the one received message)."""
    sizes = [_nbytes(spec) for spec in layout.specs]
    packed = p2p.recv(TensorSpec((sum(sizes),), torch.uint8), peer, kind, mb, step)
    out, offset = [], 0
    for spec, size in zip(layout.specs, sizes):
        n = torch.Size(spec.shape).numel() * torch.empty((), dtype=spec.dtype).element_size()
        out.append(packed[offset:offset + n].view(spec.dtype).view(spec.shape))
        offset += size
    return out


def _describe(node: Structure, specs: tuple[TensorSpec, ...]) -> str:
    tag = node[0]
    if tag == "T":
        s = specs[node[1]]
        return f"{str(s.dtype).replace('torch.', '')}{list(s.shape)}"
    if tag == "N":
        return "None"
    if tag in ("tuple", "list"):
        inner = ", ".join(_describe(n, specs) for n in node[1])
        return f"({inner})" if tag == "tuple" else f"[{inner}]"
    return "{" + ", ".join(f"{k}: {_describe(n, specs)}" for k, n in node[1]) + "}"


class BoundaryMismatch(ValueError):
    """Two ranks that exchange tensors disagree on what crosses their boundary."""


_MISSING = object()

# (peer rank, kind) -> layout key, or None for "whatever the sender declares" (a receiver that learns it).
Declarations = dict[tuple[int, str], Any]


def gather_objects(obj: Any, group=None, wait: Callable[[object, str], None] | None = None,
                   device: torch.device | str = "cpu") -> list[Any]:
    """All-gather a picklable object over ``group`` with async collectives waited through ``wait``
    (a failure-aware runtime's wait: a peer that dies during the handshake is detected, not hung on)."""
    wait = wait or (lambda work, what: work.wait())
    world = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    wait(launch(dist.all_gather, sizes, size, group=group, async_op=True), "boundary handshake (sizes)")
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    buf[:data.numel()].copy_(data)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    wait(launch(dist.all_gather, bufs, buf, group=group, async_op=True), "boundary handshake")
    return [pickle.loads(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths)]


def handshake(sends: Declarations, expects: Declarations, *, describe_rank: Callable[[int], str],
              hints: Mapping[str, str] | None = None, problem: str | None = None, group=None,
              wait: Callable[[object, str], None] | None = None, device: torch.device | str = "cpu"
              ) -> dict[tuple[int, str], BoundaryLayout]:
    """Agree on every boundary of a plan before its first transfer (a collective over ``group``).

    ``sends[(dst, kind)]`` / ``expects[(src, kind)]`` are this rank's :meth:`BoundaryLayout.key`
    for each pair it talks to; ``expects`` values may be None (adopt the sender's layout).
    ``problem`` is a local refusal (e.g. a model that does not fit the plan) that must stop every
    rank, not just this one. Every rank checks every pair from the same gathered data, so all of
    them raise the same :class:`BoundaryMismatch` (naming the stages via ``describe_rank`` and the
    setting to fix via ``hints[kind]``) or none does. Ranks are global ranks (peers of
    :class:`RoutedP2P` on the WORLD group). Returns this rank's receive layouts.
    """
    rank = dist.get_rank()
    gathered = gather_objects((rank, dict(sends), dict(expects), problem), group, wait, device)
    by_rank = {r: (s, e, p) for r, s, e, p in gathered}
    problems = [f"{describe_rank(r)}: {p}" for r, (_, _, p) in sorted(by_rank.items()) if p]
    if problems:
        raise BoundaryMismatch("; ".join(problems))
    hints = hints or {}
    errors: list[str] = []
    for dst, (_, expected, _) in sorted(by_rank.items()):
        for (src, kind), want in sorted(expected.items()):
            sent = by_rank.get(src, ({}, {}, None))[0].get((dst, kind), _MISSING)
            if sent is _MISSING:
                errors.append(f"{describe_rank(dst)} expects {kind} from {describe_rank(src)}, which sends none")
            elif want is not None and sent != want:
                errors.append(f"{describe_rank(src)} sends {kind} {BoundaryLayout.from_key(sent).describe()} but "
                              f"{describe_rank(dst)} expects {BoundaryLayout.from_key(want).describe()}"
                              + (f" ({hints[kind]})" if kind in hints else ""))
    for src, (sent_by, _, _) in sorted(by_rank.items()):
        for (dst, kind) in sorted(sent_by):
            if (src, kind) not in by_rank.get(dst, ({}, {}, None))[1]:
                errors.append(f"{describe_rank(src)} sends {kind} to {describe_rank(dst)}, which expects none")
    if errors:
        raise BoundaryMismatch("stage boundaries disagree, refused before any transfer: " + "; ".join(errors))
    return {(src, kind): BoundaryLayout.from_key(by_rank[src][0][(rank, kind)]) for (src, kind) in expects}


