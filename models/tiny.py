"""Tiny random checkpoints in the real on-disk format of each family.

`transformers` writes them with `save_pretrained`, so the files carry the
family's own per-expert tensor names (Mixtral's `block_sparse_moe.experts.N.w1`,
the others' `mlp.experts.N.gate_proj`), exactly what a worker meets on the Hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
from moecluster.models.families import family


def create_checkpoint(
    family_name: str,
    out: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 32,
    experts: int = 8,
    top_k: int = 2,
    vocab: int = 128,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Writes config.json + safetensors of a random `family_name` model to `out`; returns `out`.

    Weights are drawn with a larger spread than transformers' default (0.02) so
    the router makes clear-cut choices and expert outputs matter in the logits.
    `max_shard_size` (e.g. "50KB") splits the weights over several files with a
    `model.safetensors.index.json`, as large checkpoints are.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = family(family_name)
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"need 1 <= top_k <= experts, got top_k={top_k}, experts={experts}")
    if layers < 1 or hidden < 1 or intermediate < 1:
        raise ValueError("layers, hidden and intermediate must be positive")
    overrides = dict(fam.tiny)
    if fam.model_type == "deepseek_v3":
        if experts % overrides["n_group"]:
            overrides.update(n_group=1, topk_group=1)
        layers += overrides["first_k_dense_replace"]  # `layers` counts MoE layers
    if "head_dim" in overrides:
        overrides["head_dim"] = max(4, hidden // overrides["num_attention_heads"])
    config = AutoConfig.for_model(
        fam.model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_experts_per_tok=top_k,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **{fam.experts_field: experts, fam.intermediate_field: intermediate},
        **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out
