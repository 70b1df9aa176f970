"""The `experts` module of a transformers MoE block, computed by remote workers.

In `transformers` 5 every MoE family's sparse block calls
`self.experts(hidden_states, top_k_index, top_k_weights)`; swapping that one
module keeps the model's own router, shared experts and everything dense.
"""

from __future__ import annotations

import torch
from moecluster.frontend.dispatcher import Dispatcher
from torch import nn


class RemoteExperts(nn.Module):
    def __init__(self, layer: int, num_experts: int, dispatcher: Dispatcher):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.dispatcher = dispatcher

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """(T, H) float, (T, K) int, (T, K) float -> (T, H)."""
        return self.dispatcher.forward(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}"


def swap_experts(model: nn.Module, moe_layers: tuple[int, ...], num_experts: int, dispatcher: Dispatcher) -> int:
    """Replaces each `layers.N.<block>.experts` module with a RemoteExperts; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        parts = name.split(".")
        if parts[-1] != "experts" or "layers" not in parts or not hasattr(module, "gate_up_proj"):
            continue
        layer = int(parts[parts.index("layers") + 1])
        parent = model.get_submodule(".".join(parts[:-1]))
        parent.experts = RemoteExperts(layer, num_experts, dispatcher)
        swapped += 1
    if swapped != len(moe_layers):
        raise RuntimeError(f"found {swapped} experts modules in the model, expected {len(moe_layers)} ({moe_layers})")
    return swapped
