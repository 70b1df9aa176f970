"""The MoE families we serve, as data.

`transformers` 5 gives every family the same `mlp.experts` module (stacked
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) and knows how each one's
checkpoint names stack into it. What differs, and lives here, is only which
config fields name the expert count and size, and what a tiny model of the
family looks like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' `model_type`
    experts_field: str  # config field: number of routed experts
    intermediate_field: str  # config field: each expert's intermediate size
    tiny: dict[str, Any] = field(default_factory=dict)  # config overrides for a tiny model


_ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("mixtral", "num_local_experts", "intermediate_size", {**_ATTENTION}),
        Family("qwen2_moe", "num_experts", "moe_intermediate_size",
               {**_ATTENTION, "shared_expert_intermediate_size": 48, "intermediate_size": 64}),
        Family("qwen3_moe", "num_experts", "moe_intermediate_size", {**_ATTENTION, "intermediate_size": 64}),
        Family("olmoe", "num_experts", "intermediate_size", {**_ATTENTION}),
        Family("deepseek_v3", "n_routed_experts", "moe_intermediate_size", {
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 64,
            "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
            "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
            "v_head_dim": 8, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        }),
    ]
}


def family(model_type: str) -> Family:
    """The family of a `model_type`, or a ValueError naming the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"unsupported model family {model_type!r}; supported: {', '.join(sorted(FAMILIES))}") from None
