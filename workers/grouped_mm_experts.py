"""The expert FFN through `torch._grouped_mm`: PyTorch's own grouped GEMM (CUTLASS on Hopper).

A second GPU path beside the Triton kernels, so the faster of the two can be picked per
shape (`kernel_tuning`'s "backend").  Assignments are sorted by expert (no padding: the
grouped GEMM takes group offsets), the routing weight is applied between the GEMMs, and
rows not served here are masked at both ends, so whatever the GEMM leaves in rows outside
every group never reaches the output or a gradient.  Differentiable through PyTorch's
own `_grouped_mm` derivative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm_experts", "grouped_mm_supported"]


def grouped_mm_supported(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """torch._grouped_mm on CUDA takes bf16 on sm90+, with 16-byte aligned rows."""
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16 == gate_up.dtype == down.dtype):
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return x.shape[1] % 8 == 0 and down.shape[2] % 8 == 0


def grouped_mm_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights) -> torch.Tensor:
    """`kernels.fused_experts` (same arguments and result) on torch._grouped_mm; no host sync."""
    x = hidden_states.to(gate_up_proj.dtype)
    t, hid = x.shape
    k, num_e, inter = top_k_index.shape[1], gate_up_proj.shape[0], down_proj.shape[2]
    flat = top_k_index.reshape(-1).long()
    key = torch.where(flat >= 0, flat, num_e)  # not served: sorted last, outside every group
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_e + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:num_e], 0).int()
    served = (key[order] < num_e)[:, None]
    xs = torch.where(served, x[order // k], 0)
    w = torch.where(served, top_k_weights.to(x.dtype).reshape(-1)[order, None], 0)
    h = torch._grouped_mm(xs, gate_up_proj.transpose(1, 2), offs=offs)
    a = (F.silu(h[:, :inter].float()) * h[:, inter:].float() * w.float()).to(x.dtype)  # fp32: dL/dw sums I terms
    ys = torch.where(served, torch._grouped_mm(a, down_proj.transpose(1, 2), offs=offs), 0)
    y = torch.empty_like(ys).index_copy(0, order, ys)
    return y.view(t, k, hid).sum(1, dtype=torch.float32).to(hidden_states.dtype)
