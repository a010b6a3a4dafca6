"""Pipeline stage models from megatron-core parts, for the ring (home-stage) and linear layouts.

* ``linear``: megatron's own :class:`GPTModel` per pipeline stage (``pre_process`` on the first,
  ``post_process`` on the last), tied embeddings kept in sync by megatron's embedding group.
* ``ring`` (SkipPipe): :class:`RingGPTStage`. Stage 0 (home) holds the token embedding and the
  final norm + output layer, tied locally (the same parameter), and no transformer layers; body
  stages hold ``layers_per_stage`` layers each in a :class:`TransformerBlock`, all numbered
  ``1..layers_per_stage`` so body stages have identical parameter names and shapes (a stage can
  be skipped, swapped, or rebuilt from a neighbour).

Both take GPTModel's call signature ``model(input_ids, position_ids, attention_mask, labels=)``
so one megatron ``forward_step_func`` drives either. The routed schedule tells a ring stage which
part to run via :meth:`RingGPTStage.set_routed_part` (embed / body / head).

Weights depend only on ``(seed, stage)``: the global CPU RNG is reseeded before each stage is
built and megatron's CPU initialisation draws full (unsplit) weights, so every replica, every TP
size and a single-process reference start from the same values.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from ...runtime.program import PART_BODY, PART_EMBED, PART_HEAD

RING_PARTS = (PART_EMBED, PART_BODY, PART_HEAD)


def gpt_config(*, num_layers: int, hidden_size: int, num_attention_heads: int, ffn_hidden_size: int | None = None,
               tensor_parallel: int = 1, pipeline_parallel: int = 1, dtype: torch.dtype = torch.float32,
               init_std: float = 0.02, **overrides) -> TransformerConfig:
    """A LLaMa-style TransformerConfig (RMSNorm, SwiGLU, RoPE, no biases, no dropout) that runs on CPU.

    Fusions are off and ``use_cpu_initialization`` is on (CPU-safe and TP-invariant init).
    """
    kw = dict(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
              ffn_hidden_size=ffn_hidden_size or 4 * hidden_size, tensor_model_parallel_size=tensor_parallel,
              pipeline_model_parallel_size=pipeline_parallel, pipeline_dtype=dtype, params_dtype=dtype,
              normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
              add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=init_std,
              use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
              persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
              gradient_accumulation_fusion=False, layernorm_epsilon=1e-5)
    kw.update(overrides)
    return TransformerConfig(**kw)


class RingGPTStage(LanguageModule):
    """One ring-layout stage: ``home=True`` -> embedding + final norm + output layer (tied);
    otherwise ``num_layers`` transformer layers (no final norm)."""

    def __init__(self, config: TransformerConfig, layer_spec: ModuleSpec, vocab_size: int, max_sequence_length: int,
                 *, home: bool, num_layers: int = 0, share_embeddings_and_output_weights: bool = True,
                 rotary_base: int = 10000, pg_collection: Optional[ProcessGroupCollection] = None):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        if home:
            # The tie is local (embedding and head on one stage): no embedding group to sync.
            pg_collection = copy.copy(pg_collection)
            pg_collection.embd = None
        super().__init__(config=config, pg_collection=pg_collection)
        self.home = home
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = home
        self.post_process = home
        self.vocab_size = vocab_size
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights and home
        self.input_tensor: Optional[Tensor] = None
        self.part = PART_EMBED if home else PART_BODY
        if home:
            self.embedding = LanguageModelEmbedding(config=config, vocab_size=vocab_size,
                                                    max_sequence_length=max_sequence_length,
                                                    position_embedding_type="rope", tp_group=self.pg_collection.tp)
            self.final_layernorm = build_module(layer_spec.submodules.input_layernorm, config=config,
                                                hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=self.share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp)
            self.setup_embeddings_and_output_layer()
        else:
            if num_layers < 1:
                raise ValueError(f"model.layers_per_stage must be >= 1 on a body stage, got {num_layers}")
            # Local layer numbering 1..n on every body stage: a config with this stage's layer count, no PP split.
            block_config = dataclasses.replace(config, num_layers=num_layers, pipeline_model_parallel_size=1)
            self.rotary_pos_emb = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                                  rotary_base=rotary_base,
                                                  use_cpu_initialization=config.use_cpu_initialization,
                                                  cp_group=self.pg_collection.cp)
            self.decoder = TransformerBlock(config=block_config, spec=layer_spec, pre_process=False,
                                            post_process=False, pg_collection=self.pg_collection)

    # ------------------------------------------------------------------ routing hooks
    def set_routed_part(self, part: str) -> None:
        """Select the part the next forward runs (the routed schedule calls this)."""
        if part not in RING_PARTS:
            raise ValueError(f"ring stage: unknown part {part!r}")
        if (part == PART_BODY) == self.home:
            raise ValueError(f"ring stage: part {part!r} does not live on a {'home' if self.home else 'body'} stage")
        self.part = part

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's pipeline hook: the activation received from the previous hop."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "input_tensor should only be length 1 for gpt"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor
        if not self.home:
            self.decoder.set_input_tensor(input_tensor)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, **_: object) -> Tensor:
        """GPTModel's signature. embed -> hidden [s, b, h]; body -> hidden; head -> per-token loss
        [b, s] (or logits [b, s, v/tp] without labels)."""
        if self.part == PART_EMBED:
            return self.embedding(input_ids=input_ids, position_ids=position_ids)
        if self.part == PART_BODY:
            hidden = self.input_tensor
            rotary = self.rotary_pos_emb(hidden.shape[0])
            return self.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary)
        hidden = self.final_layernorm(self.input_tensor)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)


def build_stage_model(layout: str, config: TransformerConfig, *, stage: int, num_stages: int, vocab_size: int,
                      seq_len: int, layers_per_stage: int, seed: int, tie_embeddings: bool = True,
                      pg_collection: Optional[ProcessGroupCollection] = None) -> torch.nn.Module:
    """This pipeline stage's model (unwrapped, fp32, CPU or current CUDA device).

    ``config.num_layers`` must be ``num_stages * layers_per_stage`` (linear) or
    ``(num_stages - 1) * layers_per_stage`` (ring: the home stage holds no layers).
    """
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    torch.manual_seed(seed * 1000 + stage)  # weights depend on (seed, stage) only
    if layout == "linear":
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                        max_sequence_length=seq_len, pre_process=stage == 0, post_process=stage == num_stages - 1,
                        share_embeddings_and_output_weights=tie_embeddings, position_embedding_type="rope",
                        pg_collection=pg_collection)
    if layout == "ring":
        return RingGPTStage(config, spec, vocab_size, seq_len, home=stage == 0,
                            num_layers=0 if stage == 0 else layers_per_stage,
                            share_embeddings_and_output_weights=tie_embeddings, pg_collection=pg_collection)
    raise ValueError(f"model.layout: {layout!r} is not one of ('ring', 'linear')")
