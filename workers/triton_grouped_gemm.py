"""The Triton kernels of the fused MoE experts (launched by `triton_experts.py`).

Every M-block of a grouped GEMM belongs to one expert (rows sorted by expert and padded
to BLOCK_M by `triton_routing.align`) and reads that expert's weights:

  forward   gate_up_kernel   h = x[tok] @ gate_up[e]^T, a = silu(g) * u
            down_kernel      y[id] = w * (a @ down[e]^T)
            combine_kernel   out[t] = sum_k y[t*K + k]      (unserved slots skipped)
  backward  grad_act_kernel  p = dy[tok] @ down[e]; dw = <p, a>; dh = (dg, du); wa = w * a
            grad_x_kernel    dx[id] = dh @ gate_up[e]    (+ combine_kernel)
            grad_weight_kernel  dgate_up[e] = dh_e^T @ x_e, ddown[e] = dy_e^T @ wa_e
                                 (wa = w * a from grad_act_kernel)

Intermediates (h, a, dh) are kept in the input dtype; every dot accumulates in fp32.
Under TRITON_INTERPRET=1 (tests on a CPU) dots run on fp32-upcast operands (UPCAST): the
interpreter's 16-bit `tl.dot` is not trustworthy.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M M-blocks sweep the N-blocks together, so B tiles stay in L2."""
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _mainloop(acc, a_ptrs, stride_ak, b_ptrs, stride_bk, K,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc += A @ B over K: A tile (BM, BK) at a_ptrs, B tile (BK, BN) at b_ptrs.  Rows and
    columns are always in bounds (padding rows read token 0, columns wrap), so only a
    ragged K needs a mask, and EVEN_K (K % BLOCK_K == 0) loads with none."""
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _mainloop_tma(acc, a_ptrs, stride_ak, a_desc, a_row, b_desc, b_row, b_col, K,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, A_DESC: tl.constexpr, B_NK: tl.constexpr,
                  UPCAST: tl.constexpr, PREC: tl.constexpr):
    """_mainloop with the weight tile (and, if A_DESC, the A tile) loaded through TMA tensor
    descriptors over 2-D views: A rows [a_row, a_row + BM) and, for B, rows [b_row, b_row + BN)
    of an (N, K) weight (B_NK) or rows [b_row + k, ...) and columns [b_col, b_col + BN) of a
    (K, N) one.  Out-of-bounds boxes read zeros; a box that runs into the next expert's rows only
    meets zero A columns (past K) or rows whose results are masked at the store."""
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if A_DESC:
            a = a_desc.load([a_row, k * BLOCK_K])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k < K - k * BLOCK_K)[None, :], other=0.0)
        if B_NK:
            b = b_desc.load([b_row, k * BLOCK_K]).T
        else:
            b = b_desc.load([b_row + k * BLOCK_K, b_col])
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _block_rows(sorted_ids_ptr, block_expert_ptr, pid_m, n, topk, BLOCK_M: tl.constexpr):
    """Rows of M-block pid_m: sorted row offsets (int64), assignment ids, their tokens (token 0
    for padding rows, so loads need no row mask), row mask, expert."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    row_ok = ids < n
    return offs_m.to(tl.int64), ids.to(tl.int64), tl.where(row_ok, ids // topk, 0).to(tl.int64), row_ok, e


# ----------------------------------------------------------------------------- forward


@triton.jit
def gate_up_kernel(x_ptr, w_ptr, h_ptr, a_ptr, sorted_ids_ptr, block_expert_ptr, rows_used_ptr,
                    R, H, I, n, topk,
                    s_xm, s_xk, s_we, s_wn, s_wk, s_hm, s_am,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    STORE_H: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    TMA: tl.constexpr = False, A_DESC: tl.constexpr = False):
    """Per (M-block, N-block of I): gate and up accumulators share the x tile; SwiGLU in the epilogue.
    TMA: w_ptr is a tensor descriptor over gate_up viewed as (E * 2I, H); A_DESC: x_ptr one over
    x already gathered into sorted-row order (R, H)."""
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(I, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(rows_used_ptr):
        return
    offs_m, ids, tok, row_ok, e = _block_rows(sorted_ids_ptr, block_expert_ptr, pid_m, n, topk, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    if A_DESC:
        a_ptrs = sorted_ids_ptr  # unused
    else:
        a_ptrs = x_ptr + tok[:, None] * s_xm + offs_k[None, :] * s_xk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        w_row = (e * 2 * I + pid_n * BLOCK_N).to(tl.int32)  # gate rows; up rows I further
        for k in range(0, tl.cdiv(H, BLOCK_K)):
            if A_DESC:
                a = x_ptr.load([(pid_m * BLOCK_M).to(tl.int32), k * BLOCK_K])
            elif EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(offs_k < H - k * BLOCK_K)[None, :], other=0.0)
            bg = w_ptr.load([w_row, k * BLOCK_K]).T
            bu = w_ptr.load([w_row + I, k * BLOCK_K]).T
            if UPCAST:
                a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
            a_ptrs += BLOCK_K * s_xk
    else:
        g_ptrs = w_ptr + e * s_we + (offs_n % I)[None, :] * s_wn + offs_k[:, None] * s_wk
        u_ptrs = g_ptrs + I * s_wn
        for k in range(0, tl.cdiv(H, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                bg = tl.load(g_ptrs)
                bu = tl.load(u_ptrs)
            else:
                k_ok = offs_k < H - k * BLOCK_K
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                bg = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
                bu = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
            a_ptrs += BLOCK_K * s_xk
            g_ptrs += BLOCK_K * s_wk
            u_ptrs += BLOCK_K * s_wk
    ok = n_ok[None, :] & (offs_m >= 0)[:, None]  # padding rows too: finite (token 0), so the down GEMM reads no garbage
    dt = a_ptr.dtype.element_ty
    if STORE_H:
        h_ptrs = h_ptr + offs_m[:, None] * s_hm + offs_n[None, :]
        tl.store(h_ptrs, acc_g.to(dt), mask=ok)
        tl.store(h_ptrs + I, acc_u.to(dt), mask=ok)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(a_ptr + offs_m[:, None] * s_am + offs_n[None, :], act.to(dt), mask=ok)


@triton.jit
def down_kernel(a_ptr, w_ptr, y_ptr, rw_ptr, sorted_ids_ptr, block_expert_ptr, rows_used_ptr,
                 R, H, I, n, topk,
                 s_am, s_we, s_wn, s_wk, s_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr = False):
    """y[id] = w[id] * (a_row @ down[e]^T) for the sorted rows of one M-block and N-block of H.
    TMA: a_ptr and w_ptr are tensor descriptors over act (R, I) and down viewed as (E * H, I)."""
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(H, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(rows_used_ptr):
        return
    offs_m, ids, tok, row_ok, e = _block_rows(sorted_ids_ptr, block_expert_ptr, pid_m, n, topk, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        acc = _mainloop_tma(acc, rw_ptr, 0, a_ptr, (pid_m * BLOCK_M).to(tl.int32), w_ptr,
                            (e * H + pid_n * BLOCK_N).to(tl.int32), 0, I, BLOCK_K, EVEN_K, True, True, UPCAST, PREC)
    else:
        acc = _mainloop(acc, a_ptr + offs_m[:, None] * s_am + offs_k[None, :], 1,
                        w_ptr + e * s_we + (offs_n % H)[None, :] * s_wn + offs_k[:, None] * s_wk, s_wk, I,
                        BLOCK_K, EVEN_K, UPCAST, PREC)
    rw = tl.load(rw_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    tl.store(y_ptr + ids[:, None] * s_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def combine_kernel(y_ptr, idx_ptr, out_ptr, H, topk, s_ym, s_om,
                    BLOCK_H: tl.constexpr, BLOCK_KK: tl.constexpr):
    """out[t] = sum over served slots k of y[t*K + k], in fp32; slots with index < 0 are never read."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    ks = tl.arange(0, BLOCK_KK)
    k_ok = ks < topk
    served = (tl.load(idx_ptr + t * topk + ks, mask=k_ok, other=-1) >= 0) & k_ok
    rows = t * topk + ks
    y = tl.load(y_ptr + rows[:, None] * s_ym + offs_h[None, :], mask=served[:, None] & h_ok[None, :], other=0.0)
    tl.store(out_ptr + t * s_om + offs_h, tl.sum(y.to(tl.float32), axis=0).to(out_ptr.dtype.element_ty), mask=h_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def grad_act_kernel(dy_ptr, w_ptr, h_ptr, rw_ptr, dh_ptr, wa_ptr, dw_ptr, sorted_ids_ptr, block_expert_ptr,
                     rows_used_ptr, R, H, I, n, topk,
                     s_dym, s_we, s_wk, s_wn, s_hm, s_dhm, s_wam,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     STORE_WA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                     TMA: tl.constexpr = False, A_DESC: tl.constexpr = False):
    """p = dy[tok] @ down[e] (N over I); epilogue: dw partial <p, a> per N-block, dg and du into dh,
    and w * a into wa for the down-weight gradient (a pure GEMM then, not an activation per tile).

    With s = sigmoid(g): a = g*s*u, dL/dw = <p, a>, dL/dg = w*p*u*s*(1 + g*(1-s)), dL/du = w*p*g*s."""
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(I, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(rows_used_ptr):
        return
    offs_m, ids, tok, row_ok, e = _block_rows(sorted_ids_ptr, block_expert_ptr, pid_m, n, topk, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if A_DESC:  # dy_ptr: a descriptor over dy gathered into sorted-row order (R, H)
        p = _mainloop_tma(acc, sorted_ids_ptr, 0, dy_ptr, (pid_m * BLOCK_M).to(tl.int32), w_ptr,
                          (e * H).to(tl.int32), pid_n * BLOCK_N, H, BLOCK_K, EVEN_K, True, False, UPCAST, PREC)
    elif TMA:  # w_ptr: a descriptor over down viewed as (E * H, I)
        p = _mainloop_tma(acc, dy_ptr + tok[:, None] * s_dym + offs_k[None, :], 1, w_ptr, 0, w_ptr,
                          (e * H).to(tl.int32), pid_n * BLOCK_N, H, BLOCK_K, EVEN_K, False, False, UPCAST, PREC)
    else:
        p = _mainloop(acc, dy_ptr + tok[:, None] * s_dym + offs_k[None, :], 1,
                      w_ptr + e * s_we + (offs_n % I)[None, :] * s_wn + offs_k[:, None] * s_wk, s_wk, H,
                      BLOCK_K, EVEN_K, UPCAST, PREC)
    ok = row_ok[:, None] & n_ok[None, :]
    h_ptrs = h_ptr + offs_m[:, None] * s_hm + offs_n[None, :]
    g = tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h_ptrs + I, mask=ok, other=0.0).to(tl.float32)
    rw = tl.load(rw_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    s = tl.sigmoid(g)
    silu = g * s
    tl.store(dw_ptr + pid_n * n + ids, tl.sum(p * silu * u, axis=1), mask=row_ok)
    dt = dh_ptr.dtype.element_ty
    dh_ptrs = dh_ptr + offs_m[:, None] * s_dhm + offs_n[None, :]
    ok = n_ok[None, :] & (offs_m >= 0)[:, None]  # padding rows get exact zeros (rw = 0) for the dx GEMM
    tl.store(dh_ptrs, (rw * p * u * s * (1.0 + g * (1.0 - s))).to(dt), mask=ok)
    tl.store(dh_ptrs + I, (rw * p * silu).to(dt), mask=ok)
    if STORE_WA:
        tl.store(wa_ptr + offs_m[:, None] * s_wam + offs_n[None, :], (rw * silu * u).to(dt), mask=ok)


@triton.jit
def grad_x_kernel(dh_ptr, w_ptr, dx_ptr, sorted_ids_ptr, block_expert_ptr, rows_used_ptr,
                   R, H, I, n, topk,
                   s_dhm, s_we, s_wk, s_wn, s_dxm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr = False):
    """dx[id] = dh_row @ gate_up[e] (K over 2I, N over H), per assignment; combined per token after.
    TMA: dh_ptr and w_ptr are tensor descriptors over dh (R, 2I) and gate_up viewed as (E * 2I, H)."""
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(H, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(rows_used_ptr):
        return
    offs_m, ids, tok, row_ok, e = _block_rows(sorted_ids_ptr, block_expert_ptr, pid_m, n, topk, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        acc = _mainloop_tma(acc, sorted_ids_ptr, 0, dh_ptr, (pid_m * BLOCK_M).to(tl.int32), w_ptr,
                            (e * 2 * I).to(tl.int32), pid_n * BLOCK_N, 2 * I, BLOCK_K, EVEN_K, True, False,
                            UPCAST, PREC)
    else:
        acc = _mainloop(acc, dh_ptr + offs_m[:, None] * s_dhm + offs_k[None, :], 1,
                        w_ptr + e * s_we + (offs_n % H)[None, :] * s_wn + offs_k[:, None] * s_wk, s_wk, 2 * I,
                        BLOCK_K, EVEN_K, UPCAST, PREC)
    tl.store(dx_ptr + ids[:, None] * s_dxm + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def grad_weight_kernel(a_ptr, b_ptr, out_ptr, sorted_ids_ptr, pad_start_ptr, padded_ptr,
                        N, K, n, topk,
                        s_am, s_bm, s_oe, s_on,
                        A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                        UPCAST: tl.constexpr, PREC: tl.constexpr):
    """out[e] (N, K) = A_e^T @ B_e over expert e's rows: one (N, K) tile per program, looping over the rows.

    A row is read at its token (`*_BY_TOKEN`: x, dy) or at its sorted row (dh, wa):
    dgate_up[e] = dh_e^T @ x_e (N = 2I, K = H) and ddown[e] = dy_e^T @ wa_e (N = H, K = I)."""
    e = tl.program_id(0).to(tl.int64)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n, pid_k = tl.program_id(1) // num_k, tl.program_id(1) % num_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = offs_n < N, offs_k < K
    start = tl.load(pad_start_ptr + e)
    end = start + tl.load(padded_ptr + e)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ids = tl.load(sorted_ids_ptr + offs_r, mask=offs_r < end, other=n)
        row_ok = ids < n
        tok = (ids // topk).to(tl.int64)
        row = offs_r.to(tl.int64)
        a_rows = tok if A_BY_TOKEN else row
        b_rows = tok if B_BY_TOKEN else row
        a_t = tl.load(a_ptr + a_rows[None, :] * s_am + offs_n[:, None], mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        bs = tl.load(b_ptr + b_rows[:, None] * s_bm + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a_t, bs = a_t.to(tl.float32), bs.to(tl.float32)
        acc = tl.dot(a_t, bs, acc, input_precision=PREC)
    tl.store(out_ptr + e * s_oe + offs_n[:, None] * s_on + offs_k[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])
