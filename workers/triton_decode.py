"""Triton experts for a few tokens (decode): no routing at all, two launches.

Sorting a handful of (token, slot) assignments by expert costs more than the GEMVs
themselves (the routing launch alone took 11 us of 47 at T = 1 on an H100), so each
assignment reads its expert's gate and up rows directly (`_decode_gate_up_kernel`), and
one program per token runs the down GEMVs of all its K slots and sums them
(`_decode_down_kernel`): weights are read once per assignment at full bandwidth.
`triton_experts.triton_fused_experts` picks this path where the tuned table has a
"decode" entry for the batch size.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["decode_forward"]


@triton.jit
def _decode_gate_up_kernel(x_ptr, w_ptr, idx_ptr, act_ptr, H, I, topk, s_xm, s_we, s_wn, s_am,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Small batches, no routing: per (assignment j = t*K + k, N-block of I) a GEMV over H with
    expert idx[j]'s gate and up rows, act[j] = silu(g) * u; unserved slots are skipped."""
    j = tl.program_id(0).to(tl.int64)
    e = tl.load(idx_ptr + j).to(tl.int64)
    if e < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g_ptrs = w_ptr + e * s_we + (offs_n % I)[:, None] * s_wn
    x_row = x_ptr + (j // topk) * s_xm
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            xk = tl.load(x_row + offs_k)
            wg = tl.load(g_ptrs + offs_k[None, :])
            wu = tl.load(g_ptrs + I * s_wn + offs_k[None, :])
        else:
            k_ok = offs_k < H
            xk = tl.load(x_row + offs_k, mask=k_ok, other=0.0)
            wg = tl.load(g_ptrs + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            wu = tl.load(g_ptrs + I * s_wn + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        xk = xk.to(tl.float32)[None, :]
        acc_g += tl.sum(wg.to(tl.float32) * xk, axis=1)
        acc_u += tl.sum(wu.to(tl.float32) * xk, axis=1)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + j * s_am + offs_n, act.to(act_ptr.dtype.element_ty), mask=offs_n < I)


@triton.jit
def _decode_down_kernel(act_ptr, w_ptr, idx_ptr, rw_ptr, out_ptr, H, I, topk, s_am, s_we, s_wn, s_om,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TOPK: tl.constexpr, EVEN_K: tl.constexpr):
    """out[t] (N-block of H) = sum over served slots k of w[t,k] * act[t*K+k] @ down[idx[t,k]]^T:
    the down GEMVs of all K slots at once and the combine, in fp32."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = tl.arange(0, TOPK)
    j = t * topk + slots
    e = tl.load(idx_ptr + j, mask=slots < topk, other=-1).to(tl.int64)
    served = e >= 0
    wgt = tl.load(rw_ptr + j, mask=served, other=0.0).to(tl.float32)
    w_ptrs = w_ptr + tl.maximum(e, 0)[:, None, None] * s_we + (offs_n % H)[None, :, None] * s_wn
    a_ptrs = act_ptr + j[:, None] * s_am
    acc = tl.zeros((TOPK, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            ok = served[:, None] & (offs_k >= 0)[None, :]
        else:
            ok = served[:, None] & (offs_k < I)[None, :]
        a = tl.load(a_ptrs + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + offs_k[None, None, :], mask=ok[:, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[:, None, :], axis=2)
    out = tl.sum(acc * wgt[:, None], axis=0)
    tl.store(out_ptr + t * s_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < H)


def decode_forward(x, gate_up, down, top_k_index, rw, d):
    """Forward for a few tokens with no routing at all: two launches (gate_up GEMVs per assignment,
    then the down GEMVs with the combine); d is the config's "decode" entry."""
    t, hid = x.shape
    k, inter = top_k_index.shape[1], down.shape[2]
    out = x.new_empty(t, hid)
    if t == 0:
        return out
    act = x.new_empty(t * k, inter)
    _decode_gate_up_kernel[(t * k, triton.cdiv(inter, d["BLOCK_N"]))](
        x, gate_up, top_k_index, act, hid, inter, k, x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        BLOCK_N=d["BLOCK_N"], BLOCK_K=d["BLOCK_K"], EVEN_K=hid % d["BLOCK_K"] == 0,
        num_warps=d["num_warps"], num_stages=d["num_stages"])
    _decode_down_kernel[(t, triton.cdiv(hid, d["DOWN_BLOCK_N"]))](
        act, down, top_k_index, rw, out, hid, inter, k, act.stride(0), down.stride(0), down.stride(1), out.stride(0),
        BLOCK_N=d["DOWN_BLOCK_N"], BLOCK_K=d["DOWN_BLOCK_K"], TOPK=max(2, triton.next_power_of_2(k)),
        EVEN_K=inter % d["DOWN_BLOCK_K"] == 0, num_warps=d["down_warps"], num_stages=d["num_stages"])
    return out
