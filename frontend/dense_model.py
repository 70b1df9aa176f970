"""The model a frontend runs: `transformers`' own model with its experts remote.

Built on the meta device, experts swapped out before any memory is allocated,
then only the dense tensors are read from the checkpoint. The frontend never
holds an expert weight.
"""

from __future__ import annotations

import torch
from moecluster.frontend.dispatcher import Dispatcher
from moecluster.frontend.remote_moe import swap_experts
from moecluster.models.checkpoint import Checkpoint, CheckpointError
from torch import nn
from transformers import GenerationConfig


def load_dense_model(checkpoint: Checkpoint, dispatcher: Dispatcher, dtype: torch.dtype = torch.float32,
                     session=None, device: torch.device | str = "cpu") -> nn.Module:
    """In eval mode, on `device` (the experts' inputs and outputs cross to the CPU at each MoE layer:
    they travel as host bytes); `session` (a TrainingSession) makes the remote experts differentiable."""
    model = checkpoint.skeleton()
    geometry = checkpoint.geometry
    swap_experts(model, geometry.moe_layers, geometry.num_experts, dispatcher, session)
    model.to_empty(device=device)
    # Non-persistent buffers (rotary frequencies) are computed, not stored: rebuild them.
    model.apply(model._init_weights)
    state = checkpoint.read_dense(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint.path}: dense tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.to(dtype)
    if (checkpoint.path / "generation_config.json").is_file():  # its EOS and sampling defaults, as from_pretrained reads
        model.generation_config = GenerationConfig.from_pretrained(checkpoint.path)
    return model.eval()
