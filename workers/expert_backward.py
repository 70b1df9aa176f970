"""One MoE layer's backward on the experts one worker holds.

The forward is recomputed from the request (nothing is cached between calls, so
any replica can answer and a retried call needs nothing from the first). Two
passes: the weight gradients over every slot in one (every replica of an expert
sees the same tokens for it, so each keeps the same gradient and applies the
same update), then the input and routing-weight gradients of the primary slots,
the ones that go back to the trainer.
"""

from __future__ import annotations

import torch
from moecluster.workers.expert_store import LayerExperts
from moecluster.workers.kernels import fused_experts


def expert_backward(snapshot: LayerExperts, hidden_states: torch.Tensor, local_index: torch.Tensor,
                    top_k_weights: torch.Tensor, grad_output: torch.Tensor, primary: torch.Tensor):
    """hidden_states (T, H), local_index (T, K) slots or -1, top_k_weights (T, K), grad_output (T, H),
    primary (T, K) bool -> (grad_hidden (T, H), grad_weights (T, K), {expert: (grad gate_up, grad down)})
    for every held expert with at least one slot in the request."""
    dtype, device = snapshot.gate_up.dtype, snapshot.gate_up.device  # computed where the weights live
    x = hidden_states.to(device, dtype).detach().requires_grad_()
    w = top_k_weights.to(device, dtype).detach().requires_grad_()
    gate_up = snapshot.gate_up.detach().requires_grad_()
    down = snapshot.down.detach().requires_grad_()
    grad = grad_output.to(device, dtype)
    primary, local_index = primary.to(device), local_index.to(device)
    first = torch.where(primary, local_index, -1)
    with torch.enable_grad():
        if bool((local_index >= 0).any()):  # weight gradients over every slot, in one pass
            torch.autograd.backward(fused_experts(x.detach(), gate_up, down, local_index, w.detach()), grad)
        if bool((first >= 0).any()):  # input gradients of the primary slots
            torch.autograd.backward(fused_experts(x, gate_up.detach(), down.detach(), first, w), grad)
    grad_x = x.grad if x.grad is not None else torch.zeros_like(x)
    grad_w = w.grad if w.grad is not None else torch.zeros_like(w)
    used = set(local_index[local_index >= 0].unique().tolist())
    grads = {}
    for expert, slot in zip(snapshot.experts, snapshot.slots):
        if slot in used:
            grads[expert] = (gate_up.grad[slot].clone(), down.grad[slot].clone())
    return (grad_x.to(hidden_states.device, hidden_states.dtype),
            (grad_w * primary).to(top_k_weights.device, top_k_weights.dtype), grads)
