"""The `experts` module of a transformers MoE block, computed by remote workers.

In `transformers` 5 every MoE family's sparse block calls
`self.experts(hidden_states, top_k_index, top_k_weights)`; swapping that one
module keeps the model's own router, shared experts and everything dense.
"""

from __future__ import annotations

import torch
from moecluster.frontend.dispatcher import Dispatcher
from torch import nn


class RemoteMoE(nn.Module):
    """The remote experts of one MoE layer; differentiable when attached to a training session
    (`sdk.training.TrainingSession`), which is what the SDK calls RemoteMoE."""

    def __init__(self, layer: int, num_experts: int, dispatcher: Dispatcher, session=None):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.dispatcher = dispatcher
        self.session = session  # None: inference only

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """(T, H) float, (T, K) int, (T, K) float -> (T, H)."""
        if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
            if self.session is None:
                raise RuntimeError("these experts are remote and not attached to a training session: "
                                   "run under torch.no_grad(), or build the model with TrainingSession.model()")
            self.session.begin_step()
            return _RemoteMoEFunction.apply(hidden_states, top_k_weights, top_k_index, self)
        step = self.session.step if self.session is not None else 0  # a trainer's evaluation reads its own step too
        out = self.dispatcher.forward(self.layer, hidden_states.cpu(), top_k_index.cpu(), top_k_weights.cpu(), step=step)
        return out.to(hidden_states.device)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}"


class _RemoteMoEFunction(torch.autograd.Function):
    """Forward: one replica per expert. Backward: the output gradient to every holder of the
    experts used, which keep their weight gradients for the step and send input gradients back.
    Tensors cross to the CPU here (the wire carries host bytes) and back to the model's device."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_weights, top_k_index, module: RemoteMoE):
        hidden, weights, index = hidden_states.cpu(), top_k_weights.cpu(), top_k_index.cpu()
        ctx.save_for_backward(hidden, weights, index)
        ctx.module, ctx.device = module, hidden_states.device
        out = module.dispatcher.forward(module.layer, hidden, index, weights, step=module.session.step)
        return out.to(ctx.device)

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, top_k_weights, top_k_index = ctx.saved_tensors
        module = ctx.module
        experts = torch.unique(top_k_index[top_k_index >= 0]).tolist()
        tag = module.session.contribution(module.layer, experts)
        grad_x, grad_w = module.dispatcher.backward(module.layer, hidden_states, top_k_index, top_k_weights,
                                                    grad_output.cpu().contiguous(), tag)
        return grad_x.to(ctx.device), grad_w.to(ctx.device, top_k_weights.dtype), None, None


def swap_experts(model: nn.Module, moe_layers: tuple[int, ...], num_experts: int, dispatcher: Dispatcher,
                 session=None) -> int:
    """Replaces each `layers.N.<block>.experts` module with a RemoteMoE; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        parts = name.split(".")
        if parts[-1] != "experts" or "layers" not in parts or not hasattr(module, "gate_up_proj"):
            continue
        layer = int(parts[parts.index("layers") + 1])
        parent = model.get_submodule(".".join(parts[:-1]))
        parent.experts = RemoteMoE(layer, num_experts, dispatcher, session)
        swapped += 1
    if swapped != len(moe_layers):
        raise RuntimeError(f"found {swapped} experts modules in the model, expected {len(moe_layers)} ({moe_layers})")
    return swapped
