"""Small LLaMa-style decoder split into pipeline stages.

Two layouts are supported:

* ``ring`` (SkipPipe/CheckFree): stage 0 is the *home* stage holding the token
  embedding and the final norm + LM head; body stages ``1..S-1`` each hold the
  same number of decoder blocks, so neighbouring body stages have identical
  parameter names and shapes (CheckFree rebuilds a lost stage by averaging its
  neighbours, and SkipPipe may skip or swap body stages).
* ``linear`` (stock DeepSpeed): :func:`build_layer_list` returns
  ``[embed, block_0..block_{n-1}, head]`` for ``PipelineModule(layers=...)``.

Initialisation is a pure function of ``(seed, kind, index)``: every layer draws
from its own local ``torch.Generator`` and never touches the global RNG, so a
single-process reference and every pipeline replica get bitwise identical weights
for the same layer. All weight matrices are ``N(0, init_std)`` (no depth-dependent
output scaling, which keeps a block's weights independent of the model depth) and
norm gains are ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LlamaConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "Attention",
    "SwiGLU",
    "DecoderBlock",
    "TokenEmbedding",
    "BlockStack",
    "LMHead",
    "HomeStage",
    "lm_loss",
    "loss_fn",
    "layer_generator",
    "build_layer",
    "build_ring_stages",
    "build_layer_list",
    "reference_forward",
    "count_parameters",
]


@dataclass
class LlamaConfig:
    """Model hyper-parameters.

    ``ffn_hidden=None`` resolves to the multiple of 32 at or above ``8/3 * d_model``
    (the usual SwiGLU width that keeps the MLP's parameter count near a 4x GELU MLP).
    """

    vocab_size: int = 1024
    d_model: int = 128
    n_heads: int = 4
    ffn_hidden: Optional[int] = None
    seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.ffn_hidden is None and isinstance(self.d_model, int) and self.d_model > 0:
            self.ffn_hidden = 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> "LlamaConfig":
        """Raise ``ValueError`` naming the offending ``model.*`` field; return self."""
        for name in ("vocab_size", "d_model", "n_heads", "ffn_hidden", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} ({value!r}) must be a positive integer")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} ({value!r}) must be a positive number")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model.d_model / model.n_heads ({self.head_dim}) must be even for rotary embeddings"
            )
        return self


# ----------------------------------------------------------------------------- init


def layer_generator(seed: int, kind: str, index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, kind, index)`` via SHA-256 (stable across runs)."""
    digest = hashlib.sha256(f"{int(seed)}:{kind}:{int(index)}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


@torch.no_grad()
def _init_parameters(module: nn.Module, gen: torch.Generator, std: float) -> None:
    # Draw on CPU from the local generator in registration order, then copy, so the
    # result does not depend on the module's device or on the global RNG.
    for _, param in module.named_parameters():
        if param.dim() >= 2:
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        else:
            values = torch.ones(param.shape, dtype=torch.float32)
        param.copy_(values)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    # skip_init allocates without running the default (global-RNG) initialiser.
    return torch.nn.utils.skip_init(nn.Linear, d_in, d_out, bias=False)


# -------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """RoPE tables computed lazily for the current sequence length.

    The cos/sin caches are non-persistent buffers: they never appear in a
    ``state_dict`` (so they cannot differ between stages or break CheckFree
    averaging) and follow the module across ``.to(device)``.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("cos_cached", torch.empty(0), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0), persistent=False)

    def _tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos_cached.shape[0] < seq_len or self.cos_cached.device != device:
            inv_freq = 1.0 / (
                self.theta
                ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
            )
            pos = torch.arange(seq_len, dtype=torch.float32, device=device)
            freqs = torch.outer(pos, inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos_cached = emb.cos()
            self.sin_cached = emb.sin()
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q``/``k`` of shape ``[b, heads, s, head_dim]``."""
        cos, sin = self._tables(q.shape[-2], q.device)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.wq = _linear(cfg.d_model, cfg.d_model)
        self.wk = _linear(cfg.d_model, cfg.d_model)
        self.wv = _linear(cfg.d_model, cfg.d_model)
        self.wo = _linear(cfg.d_model, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (
            proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
            for proj in (self.wq, self.wk, self.wv)
        )
        q, k = self.rope(q, k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = _linear(cfg.d_model, cfg.ffn_hidden)
        self.w3 = _linear(cfg.d_model, cfg.ffn_hidden)
        self.w2 = _linear(cfg.ffn_hidden, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block; weights are a function of ``(seed, index)``."""

    def __init__(self, cfg: LlamaConfig, index: int = 0, seed: int = 0) -> None:
        super().__init__()
        cfg.validate()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        _init_parameters(self, layer_generator(seed, "block", index), cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TokenEmbedding(nn.Module):
    """tokens ``[b, s]`` int64 -> hidden ``[b, s, d_model]``."""

    def __init__(self, cfg: LlamaConfig, index: int = 0, seed: int = 0) -> None:
        super().__init__()
        cfg.validate()
        self.tok = torch.nn.utils.skip_init(nn.Embedding, cfg.vocab_size, cfg.d_model)
        _init_parameters(self, layer_generator(seed, "embed", index), cfg.init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens)


class BlockStack(nn.Module):
    """``n_blocks`` decoder blocks with global indices ``first_index ..``; hidden -> hidden.

    Parameter names use the *local* block position (``blocks.0...``), so every
    stack of the same size has identical state_dict keys and shapes.
    """

    def __init__(self, cfg: LlamaConfig, n_blocks: int, first_index: int = 0, seed: int = 0) -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"BlockStack needs at least one block, got n_blocks={n_blocks}")
        self.first_index = first_index
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg, first_index + j, seed) for j in range(n_blocks)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class LMHead(nn.Module):
    """Final RMSNorm + ``Linear(d_model, vocab, bias=False)``: hidden -> logits."""

    def __init__(self, cfg: LlamaConfig, index: int = 0, seed: int = 0) -> None:
        super().__init__()
        cfg.validate()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = _linear(cfg.d_model, cfg.vocab_size)
        _init_parameters(self, layer_generator(seed, "head", index), cfg.init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden))


class HomeStage(nn.Module):
    """Ring-layout stage 0: token embedding and final norm + LM head."""

    def __init__(self, cfg: LlamaConfig, seed: int = 0) -> None:
        super().__init__()
        self.embed = TokenEmbedding(cfg, 0, seed)
        self.head = LMHead(cfg, 0, seed)

    def embed_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding straight into the head (no body); the pipeline calls the halves."""
        return self.head_forward(self.embed_forward(tokens))


# --------------------------------------------------------------------------- loss


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; ``labels`` are already shifted (same positions as logits)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


#: ``PipelineModule(loss_fn=...)`` compatible alias: ``loss_fn(outputs, labels)``.
loss_fn = lm_loss


# ----------------------------------------------------------------------- builders


def build_layer(cfg: LlamaConfig, kind: str, index: int, seed: int) -> nn.Module:
    """Build one layer whose weights depend only on ``(cfg, kind, index, seed)``.

    ``kind`` is ``"embed"`` (:class:`TokenEmbedding`), ``"block"`` (:class:`DecoderBlock`)
    or ``"head"`` (:class:`LMHead`).
    """
    builders = {"embed": TokenEmbedding, "block": DecoderBlock, "head": LMHead}
    if kind not in builders:
        raise ValueError(f"build_layer: kind must be one of {sorted(builders)}, got {kind!r}")
    return builders[kind](cfg, index, seed)


def build_ring_stages(
    cfg: LlamaConfig, num_stages: int, layers_per_stage: int, seed: int
) -> list[nn.Module]:
    """``[HomeStage, BlockStack x (num_stages-1)]``; body stage ``s`` holds global
    blocks ``(s-1)*layers_per_stage ..`` so weights match :func:`build_layer_list`."""
    if num_stages < 2:
        raise ValueError(f"ring layout needs at least 2 stages (home + body), got {num_stages}")
    if layers_per_stage < 1:
        raise ValueError(f"layers_per_stage must be >= 1, got {layers_per_stage}")
    stages: list[nn.Module] = [HomeStage(cfg, seed)]
    for s in range(1, num_stages):
        stages.append(BlockStack(cfg, layers_per_stage, (s - 1) * layers_per_stage, seed))
    return stages


def build_layer_list(cfg: LlamaConfig, num_blocks: int, seed: int) -> list[nn.Module]:
    """``[embed, block_0..block_{n-1}, head]`` as separate modules (DeepSpeed layer list)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return (
        [build_layer(cfg, "embed", 0, seed)]
        + [build_layer(cfg, "block", i, seed) for i in range(num_blocks)]
        + [build_layer(cfg, "head", 0, seed)]
    )


def reference_forward(
    layers_or_stages: Sequence[nn.Module],
    tokens: torch.Tensor,
    body_order: Optional[Iterable[int]] = None,
) -> torch.Tensor:
    """Single-process forward: embed, the body entries in ``body_order``, head -> logits.

    * Ring stages (``[HomeStage, BlockStack, ...]``): ``body_order`` lists stage
      indices in ``1..S-1`` (may skip or repeat/swap).
    * Layer list (``[embed, block..., head]``): ``body_order`` lists positions in
      ``1..len-2`` of that list.

    ``None`` means every body entry in order.
    """
    mods = list(layers_or_stages)
    if isinstance(mods[0], HomeStage):
        embed, head, n_body = mods[0].embed, mods[0].head, len(mods) - 1
    else:
        embed, head, n_body = mods[0], mods[-1], len(mods) - 2
    order = list(range(1, n_body + 1)) if body_order is None else list(body_order)
    for i in order:
        if not 1 <= i <= n_body:
            raise ValueError(f"body_order entry {i} outside 1..{n_body}")
    hidden = embed(tokens)
    for i in order:
        hidden = mods[i](hidden)
    return head(hidden)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
