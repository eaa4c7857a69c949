"""Architecture facts as data: one row per model family, keyed by ``config.model_type``.

Every module path that editors and adapters touch comes from this table - never from substrings of a model's
name. Paths are relative to one decoder layer (``layers.format(L)``) unless they say otherwise. Adding an
architecture is one :func:`register_architecture` call.

GPT-2 stores linear maps as ``Conv1D`` with weight shape ``(in, out)``; every other family here uses
``nn.Linear`` with ``(out, in)``. That difference is the ``conv1d`` flag, read by :func:`linear_weight_in_out`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # config.model_type this row applies to
    layers: str  # module path of the list of decoder layers
    embed: str  # token embedding module (absolute path)
    final_norm: str  # final norm before unembedding (absolute path)
    unembed: str  # output head (absolute path)
    attn_q: str | None  # query projection (None when fused into attn_qkv)
    attn_k: str | None
    attn_v: str | None
    attn_qkv: str | None  # fused q/k/v projection (GPT-2 c_attn, NeoX query_key_value), else None
    attn_out: str  # attention output projection
    mlp_in: tuple[str, ...]  # MLP input projections (gate and up for gated MLPs)
    mlp_out: str  # MLP output projection: ROME's rewrite module
    conv1d: bool = False  # weights stored (in, out) as GPT-2's Conv1D

    def layer_path(self, layer: int, module: str) -> str:
        return f"{self.layers}.{layer}.{module}"

    def modules(self) -> dict[str, str | None]:
        """Per-layer module kinds -> relative paths (None where the family has no such module)."""
        return {
            "attn_q": self.attn_q, "attn_k": self.attn_k, "attn_v": self.attn_v, "attn_qkv": self.attn_qkv,
            "attn_out": self.attn_out, **{f"mlp_in{i}": p for i, p in enumerate(self.mlp_in)},
            "mlp_out": self.mlp_out,
        }


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    ARCHITECTURES[spec.model_type] = spec
    return spec


_LLAMA_LIKE = dict(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    attn_q="self_attn.q_proj", attn_k="self_attn.k_proj", attn_v="self_attn.v_proj", attn_qkv=None,
    attn_out="self_attn.o_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
)
register_architecture(ArchSpec(model_type="llama", **_LLAMA_LIKE))
register_architecture(ArchSpec(model_type="qwen2", **_LLAMA_LIKE))
register_architecture(ArchSpec(model_type="mistral", **_LLAMA_LIKE))
register_architecture(ArchSpec(
    model_type="gpt2", layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
    unembed="lm_head", attn_q=None, attn_k=None, attn_v=None, attn_qkv="attn.c_attn", attn_out="attn.c_proj",
    mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", conv1d=True,
))
register_architecture(ArchSpec(
    model_type="gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head", attn_q=None, attn_k=None, attn_v=None, attn_qkv="attention.query_key_value",
    attn_out="attention.dense", mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
))


def linear_weight_in_out(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A view of a linear map's weight as (d_in, d_out), whatever its storage layout."""
    return weight if conv1d else weight.T
