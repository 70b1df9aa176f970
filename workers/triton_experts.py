"""Triton fused MoE experts: the GPU path behind `kernels.fused_experts`.

Layout (as vLLM's fused_moe): the T*K (token, slot) assignments are sorted by expert
once and each expert's segment is padded to BLOCK_M in the index space only
(`triton_routing.align`), so every M-block of a grouped GEMM belongs to one expert and reads that
expert's weights.  Forward is two grouped GEMMs, gate+up with SwiGLU in its
epilogue and down with the routing weight in its epilogue, then a combine that sums
each token's K rows.  Backward (as ScatterMoE/SonicMoE) keeps only the gate/up
pre-activation h from the forward; the activation a = silu(g) * u is recomputed in
the backward's first epilogue.  The kernels are in `triton_grouped_gemm.py`; this
file launches them (configs from `kernel_tuning`, TMA where the operands allow) and
ties them into autograd.
"""

from __future__ import annotations

import os

import torch
import triton
from moecluster.workers.grouped_mm_experts import grouped_mm_supported
from moecluster.workers.kernel_tuning import device_name, pick_config
from moecluster.workers.triton_decode import decode_forward
from moecluster.workers.triton_grouped_gemm import (
    combine_kernel,
    down_kernel,
    gate_up_kernel,
    grad_act_kernel,
    grad_weight_kernel,
    grad_x_kernel,
)
from moecluster.workers.triton_routing import align

__all__ = ["triton_fused_experts", "interpreting"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------- launchers


def _modes(dtype):
    """(UPCAST, PREC): fp32 dots are exact ("ieee", not tf32) so fp32 matches the reference."""
    return interpreting(), "ieee" if dtype == torch.float32 or interpreting() else "tf32"


def _gemm_meta(cfg, kernel, reduce_len, tma=False):
    """Launch meta-parameters of one grouped GEMM: the shared BLOCK_M plus that kernel's own entry."""
    meta = {key: v for key, v in cfg[kernel].items() if key != "GATHER"}
    return dict(meta, BLOCK_M=cfg["BLOCK_M"], EVEN_K=reduce_len % cfg[kernel]["BLOCK_K"] == 0, TMA=tma)


def _tma(cfg, kernel, *operands):
    """Whether `kernel` loads its operands through TMA descriptors: its config entry asks for
    it and each operand is contiguous, non-empty, with 16-byte aligned base and rows."""
    return bool(cfg[kernel].get("TMA")) and all(
        t.is_contiguous() and t.numel() and t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() % 16 == 0
        for t in operands)


def _sorted_rows(t, route, k):
    """t (T, C) gathered into the routing's sorted-row order (R, C); padding rows read token 0."""
    ids = route.sorted_ids
    return t.index_select(0, torch.where(ids < route.n, ids // k, 0))


def _desc(t, block):
    """A 2-D TMA descriptor over t viewed as (numel / last dim, last dim), box `block`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    v = t.view(-1, t.shape[-1])
    return TensorDescriptor(v, list(v.shape), [v.stride(0), 1], list(block))


def _grid(route, cols, cfg, kernel):
    return (triton.cdiv(route.sorted_ids.numel(), cfg["BLOCK_M"]) * triton.cdiv(cols, cfg[kernel]["BLOCK_N"]),)


def _combine(y, top_k_index, t, hid, dtype):
    """(T*K, H) per-assignment rows -> (T, H) per-token sums (unserved slots skipped)."""
    out = torch.empty(t, hid, dtype=dtype, device=y.device)
    if t:
        k = top_k_index.shape[1]
        block_h = min(1024, triton.next_power_of_2(hid))
        combine_kernel[(t, triton.cdiv(hid, block_h))](
            y, top_k_index, out, hid, k, y.stride(0), out.stride(0),
            BLOCK_H=block_h, BLOCK_KK=max(2, triton.next_power_of_2(k)))
    return out


def _forward(x, gate_up, down, top_k_index, rw, cfg, keep_h: bool):
    """out (T, H), routing, (if keep_h) the gate/up pre-activations h (R, 2I) in sorted-row order, and
    x in sorted-row order (R, H) where the gate_up config gathered it first (GATHER), else None."""
    t, hid = x.shape
    num_e, inter = gate_up.shape[0], down.shape[2]
    k = top_k_index.shape[1]
    route = align(top_k_index, num_e, cfg["BLOCK_M"])
    rows = route.sorted_ids.numel()
    upcast, prec = _modes(x.dtype)
    h = x.new_empty(rows, 2 * inter) if keep_h else None
    act = x.new_empty(rows, inter)
    y = x.new_empty(t * k, hid)
    common = (route.sorted_ids, route.block_expert, route.rows_used, rows, hid, inter, route.n, k)
    c = cfg["gate_up"]
    tma = _tma(cfg, "gate_up", gate_up)
    xs = _sorted_rows(x, route, k) if tma and c.get("GATHER") and _tma(cfg, "gate_up", x) else None
    gate_up_kernel[_grid(route, inter, cfg, "gate_up")](
        x if xs is None else _desc(xs, (cfg["BLOCK_M"], c["BLOCK_K"])),
        _desc(gate_up, (c["BLOCK_N"], c["BLOCK_K"])) if tma else gate_up, h if keep_h else act, act, *common,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        h.stride(0) if keep_h else 0, act.stride(0),
        STORE_H=keep_h, UPCAST=upcast, PREC=prec, A_DESC=xs is not None, **_gemm_meta(cfg, "gate_up", hid, tma))
    c = cfg["down"]
    tma = _tma(cfg, "down", act, down)
    down_kernel[_grid(route, hid, cfg, "down")](
        _desc(act, (cfg["BLOCK_M"], c["BLOCK_K"])) if tma else act,
        _desc(down, (c["BLOCK_N"], c["BLOCK_K"])) if tma else down, y, rw, *common,
        act.stride(0), down.stride(0), down.stride(1), down.stride(2), y.stride(0),
        UPCAST=upcast, PREC=prec, **_gemm_meta(cfg, "down", inter, tma))
    return _combine(y, top_k_index, t, hid, x.dtype), route, h, xs


def _backward(dy, x, gate_up, down, top_k_index, rw, route, h, cfg, needs, xs=None):
    """Gradients (dx, dgate_up, ddown, drw) for the needs mask (x, gate_up, down, rw)."""
    need_x, need_gu, need_dn, need_w = needs
    t, hid = x.shape
    num_e, inter = gate_up.shape[0], down.shape[2]
    k = top_k_index.shape[1]
    rows, n = route.sorted_ids.numel(), route.n
    upcast, prec = _modes(x.dtype)
    common = (route.sorted_ids, route.block_expert, route.rows_used, rows, hid, inter, n, k)
    dh = x.new_empty(rows, 2 * inter)
    wa = x.new_empty(rows, inter) if need_dn else dh  # dh: an unused placeholder (STORE_WA off)
    n_blocks = triton.cdiv(inter, cfg["grad_act"]["BLOCK_N"])
    dw_part = torch.empty(n_blocks, n, dtype=torch.float32, device=x.device)
    c = cfg["grad_act"]
    tma = _tma(cfg, "grad_act", down)
    dys = _sorted_rows(dy, route, k) if tma and c.get("GATHER") and _tma(cfg, "grad_act", dy) else None
    grad_act_kernel[_grid(route, inter, cfg, "grad_act")](
        dy if dys is None else _desc(dys, (cfg["BLOCK_M"], c["BLOCK_K"])),
        _desc(down, (c["BLOCK_K"], c["BLOCK_N"])) if tma else down, h, rw, dh, wa, dw_part, *common,
        dy.stride(0), down.stride(0), down.stride(1), down.stride(2), h.stride(0), dh.stride(0), wa.stride(0),
        STORE_WA=need_dn, UPCAST=upcast, PREC=prec, A_DESC=dys is not None,
        **_gemm_meta(cfg, "grad_act", hid, tma))
    grad_x = grad_gu = grad_dn = grad_w = None
    if need_w:
        served = (top_k_index.reshape(-1) >= 0)
        grad_w = torch.where(served, dw_part.sum(0), 0.0).to(rw.dtype)
    if need_x:
        dxr = x.new_empty(t * k, hid)
        c = cfg["grad_x"]
        tma = _tma(cfg, "grad_x", dh, gate_up)
        grad_x_kernel[_grid(route, hid, cfg, "grad_x")](
            _desc(dh, (cfg["BLOCK_M"], c["BLOCK_K"])) if tma else dh,
            _desc(gate_up, (c["BLOCK_K"], c["BLOCK_N"])) if tma else gate_up, dxr, *common,
            dh.stride(0), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), dxr.stride(0),
            UPCAST=upcast, PREC=prec, **_gemm_meta(cfg, "grad_x", 2 * inter, tma))
        grad_x = _combine(dxr, top_k_index, t, hid, x.dtype)
    wcfg = cfg["grad_w"]
    if wcfg.get("backend") == "grouped_mm" and cfg["BLOCK_M"] % 16 == 0 and grouped_mm_supported(x, gate_up, down):
        # CUTLASS's grouped weight gradient (torch._grouped_mm with the groups along the
        # reduction): each expert's rows are one group, padding rows are zero in dh and wa.
        ends = route.pad_start + route.padded
        if need_gu:
            grad_gu = torch._grouped_mm(dh.t(), _sorted_rows(x, route, k) if xs is None else xs, offs=ends)
        if need_dn:
            grad_dn = torch._grouped_mm((_sorted_rows(dy, route, k) if dys is None else dys).t(), wa, offs=ends)
        return grad_x, grad_gu, grad_dn, grad_w
    meta = dict(BLOCK_N=wcfg["BLOCK_N"], BLOCK_K=wcfg["BLOCK_K"], BLOCK_R=wcfg["BLOCK_R"], UPCAST=upcast, PREC=prec,
                num_warps=wcfg["num_warps"], num_stages=wcfg["num_stages"])
    if need_gu:
        grad_gu = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        grid = (num_e, triton.cdiv(2 * inter, wcfg["BLOCK_N"]) * triton.cdiv(hid, wcfg["BLOCK_K"]))
        grad_weight_kernel[grid](dh, x, grad_gu, route.sorted_ids, route.pad_start, route.padded, 2 * inter, hid, n, k,
                                  dh.stride(0), x.stride(0), grad_gu.stride(0), grad_gu.stride(1),
                                  A_BY_TOKEN=False, B_BY_TOKEN=True, **meta)
    if need_dn:
        grad_dn = torch.empty_like(down, memory_format=torch.contiguous_format)
        grid = (num_e, triton.cdiv(hid, wcfg["BLOCK_N"]) * triton.cdiv(inter, wcfg["BLOCK_K"]))
        grad_weight_kernel[grid](dy, wa, grad_dn, route.sorted_ids, route.pad_start, route.padded, hid, inter, n, k,
                                  dy.stride(0), wa.stride(0), grad_dn.stride(0), grad_dn.stride(1),
                                  A_BY_TOKEN=True, B_BY_TOKEN=False, **meta)
    return grad_x, grad_gu, grad_dn, grad_w


class _TritonExperts(torch.autograd.Function):
    """Autograd wrapper; saves x, the weights, the routing and h (R x 2I), nothing larger."""

    @staticmethod
    def forward(ctx, x, gate_up, down, top_k_index, rw, cfg):
        out, route, h, xs = _forward(x, gate_up, down, top_k_index, rw, cfg, keep_h=True)
        ctx.save_for_backward(x, gate_up, down, top_k_index, rw, h, xs)
        ctx.route, ctx.cfg = route, cfg
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_up, down, top_k_index, rw, h, xs = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[4])
        dy = grad_out.to(x.dtype).contiguous()
        gx, ggu, gdn, gw = _backward(dy, x, gate_up, down, top_k_index, rw, ctx.route, h, ctx.cfg, needs, xs)
        return gx, ggu, gdn, None, gw, None


def triton_fused_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, config=None):
    """`kernels.fused_experts` through Triton (same arguments, shapes and result).

    config: launch parameters as `kernel_tuning` describes them; default: the tuned table
    for this shape and device, else defaults (`kernel_tuning.pick_config`)."""
    out_dtype = hidden_states.dtype
    x = hidden_states.to(gate_up_proj.dtype).contiguous()
    rw = top_k_weights.to(gate_up_proj.dtype).reshape(-1).contiguous()
    idx = top_k_index.contiguous()
    gate_up, down = gate_up_proj, down_proj
    num_e, inter, hid = gate_up.shape[0], down.shape[2], x.shape[1]
    if config is None:
        config = pick_config(num_e, inter, hid, x.shape[0], x.dtype, device_name(x.device), interpreting(), idx.shape[1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, rw)):
        out = _TritonExperts.apply(x, gate_up, down, idx, rw, config)
    elif config.get("decode") and gate_up.stride(2) == 1 and down.stride(2) == 1:
        out = decode_forward(x, gate_up, down, idx, rw, config["decode"])
    else:
        out = _forward(x, gate_up, down, idx, rw, config, keep_h=False)[0]
    return out.to(out_dtype)
