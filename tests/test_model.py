"""Tests for the LLaMa-style stage model (integration.models.llama)."""

from __future__ import annotations

import math

import pytest
import torch

from integration.models import (
    BlockStack,
    HomeStage,
    LlamaConfig,
    build_layer,
    build_layer_list,
    build_ring_stages,
    count_parameters,
    lm_loss,
    loss_fn,
    reference_forward,
)

CFG = LlamaConfig(vocab_size=64, d_model=32, n_heads=4, seq_len=16)


def _tokens(b: int = 2, s: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_defaults_and_validation() -> None:
    cfg = LlamaConfig()
    assert cfg.ffn_hidden % 32 == 0 and abs(cfg.ffn_hidden - 8 * cfg.d_model / 3) < 32
    assert cfg.validate() is cfg
    with pytest.raises(ValueError, match=r"model.d_model \(130\) must be divisible by model.n_heads \(4\)"):
        LlamaConfig(d_model=130, n_heads=4).validate()
    with pytest.raises(ValueError, match="model.vocab_size"):
        LlamaConfig(vocab_size=0).validate()
    with pytest.raises(ValueError, match="model.init_std"):
        LlamaConfig(init_std=-1.0).validate()


@pytest.mark.parametrize("kind", ["embed", "block", "head"])
def test_init_deterministic_and_rng_free(kind: str) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_layer(CFG, kind, 3, seed=7)
    assert torch.equal(before, torch.get_rng_state()), "build_layer must not touch the global RNG"
    torch.manual_seed(999)  # a different global RNG state must not matter
    b = build_layer(CFG, kind, 3, seed=7)
    assert _same_state(a, b)
    assert not _same_state(a, build_layer(CFG, kind, 4, seed=7))
    assert not _same_state(a, build_layer(CFG, kind, 3, seed=8))


def test_build_layer_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_layer(CFG, "mlp", 0, 0)


def test_shapes_and_rope_not_in_state_dict() -> None:
    tokens = _tokens()
    home = HomeStage(CFG, seed=0)
    hidden = home.embed_forward(tokens)
    assert hidden.shape == (2, 12, CFG.d_model) and hidden.dtype == torch.float32
    body = BlockStack(CFG, 2, seed=0)
    assert body(hidden).shape == hidden.shape
    logits = home.head_forward(body(hidden))
    assert logits.shape == (2, 12, CFG.vocab_size)
    assert home(tokens).shape == logits.shape
    assert not any("cos" in k or "sin" in k for k in body.state_dict())
    # seq_len longer than first call: rope tables grow on demand
    assert body(home.embed_forward(_tokens(1, 20))).shape == (1, 20, CFG.d_model)


def test_neighbour_body_stages_identical_structure() -> None:
    stages = build_ring_stages(CFG, num_stages=4, layers_per_stage=2, seed=0)
    assert isinstance(stages[0], HomeStage) and len(stages) == 4
    shapes = [{k: v.shape for k, v in s.state_dict().items()} for s in stages[1:]]
    assert shapes[0] == shapes[1] == shapes[2]
    assert count_parameters(stages[1]) == count_parameters(stages[3])
    assert not _same_state(stages[1], stages[2])  # same structure, different weights
    # CheckFree-style averaging of neighbours loads into the lost stage
    avg = {k: (stages[1].state_dict()[k] + stages[3].state_dict()[k]) / 2 for k in shapes[0]}
    stages[2].load_state_dict(avg)


def test_ring_stages_match_layer_list() -> None:
    stages = build_ring_stages(CFG, num_stages=3, layers_per_stage=2, seed=5)
    layers = build_layer_list(CFG, num_blocks=4, seed=5)
    assert _same_state(stages[0].embed, layers[0]) and _same_state(stages[0].head, layers[-1])
    for s in (1, 2):
        for j in range(2):
            assert _same_state(stages[s].blocks[j], layers[1 + (s - 1) * 2 + j])
    tokens = _tokens()
    assert torch.equal(reference_forward(stages, tokens, [1, 2]), reference_forward(layers, tokens))
    assert torch.equal(reference_forward(stages, tokens), reference_forward(stages, tokens, [1, 2]))


def test_causal() -> None:
    stages = build_ring_stages(CFG, 3, 1, seed=0)
    tokens = _tokens(1, 10)
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % CFG.vocab_size
    a, b = reference_forward(stages, tokens), reference_forward(stages, changed)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_swap_and_skip_change_output() -> None:
    stages = build_ring_stages(CFG, 4, 1, seed=0)
    tokens = _tokens()
    in_order = reference_forward(stages, tokens, [1, 2, 3])
    assert not torch.allclose(in_order, reference_forward(stages, tokens, [1, 3, 2]))
    assert not torch.allclose(in_order, reference_forward(stages, tokens, [1, 3]))
    with pytest.raises(ValueError, match="outside"):
        reference_forward(stages, tokens, [0])


def test_lm_loss_matches_manual_and_uniform_start() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    manual = -torch.log_softmax(logits, -1).gather(-1, labels[..., None]).mean()
    assert torch.allclose(lm_loss(logits, labels), manual, atol=1e-6)
    assert loss_fn is lm_loss
    stages = build_ring_stages(CFG, 2, 1, seed=0)
    loss = lm_loss(reference_forward(stages, _tokens()), _tokens(seed=2))
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.3  # small init -> near-uniform


def test_loss_decreases_with_adam() -> None:
    torch.manual_seed(0)
    stages = build_ring_stages(CFG, 3, 1, seed=0)
    params = [p for s in stages for p in s.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    data = _tokens(4, 17, seed=3)
    tokens, labels = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = lm_loss(reference_forward(stages, tokens), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
