"""Fused expert math for the expert workers.

Why this exists: transformers' eager experts forward builds a one-hot mask of
shape (E+1, K, T), launches ~10 small ops per expert, and under autograd its
``gate_up_proj[e]`` indexing makes every expert's backward allocate and add a
dense gradient the size of the whole stacked weight (E x 2I x H).  A worker
that holds only some experts also needs to skip the assignments it does not
serve.  Here the T*K (token, slot) assignments are sorted by expert once, each
expert runs two GEMMs on a contiguous slice, and the backward writes weight
gradients straight into one preallocated stacked tensor.  Plain torch, for the CPU
and any device but CUDA, where `fused_experts` hands over to the Triton kernels
(`triton_experts`) or torch._grouped_mm (`grouped_mm_experts`).  Measured on CPU:
``torch._grouped_mm`` loses to the tiled ``torch.mm(out=...)`` loop on big batches
and wins on small ones (decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["fused_experts", "reference_experts"]


def _route(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int):
    """Sort the served (token, slot) assignments by expert, once.

    top_k_index: (T, K) int64/int32, negative = not served here; top_k_weights: (T, K) float.
    Returns (perm, tok, w, counts, tiles): perm (N,) int64 flat indices into T*K of the served
    assignments grouped by expert (stable), tok = perm // K (N,) int64, w (N,) the routing
    weights in that order, counts a list of E ints (rows per expert), tiles from _plan.
    """
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # negatives ("not served") sort first
    hist = torch.bincount(flat.clamp(min=-1) + 1, minlength=num_experts + 1).tolist()  # one sync
    perm = order[hist[0]:]
    return perm, perm // k, top_k_weights.reshape(-1)[perm], hist[1:], _plan(hist[1:])


# Rows per tile.  Temporaries are tile-sized and reused across tiles: they stay in cache
# between the GEMMs and the elementwise ops, and large fresh allocations (whose page faults
# cost ~1/3 of the GEMM time on CPU) are avoided.  512-1024 rows keep sgemm near peak.
TILE_ROWS = 1024


def _plan(counts, rows: int | None = None):
    """Pack the expert-sorted rows into tiles of at most `rows` (default TILE_ROWS) rows.

    counts: list of E ints.  Returns a list of (start, end, experts, sizes, firsts): the
    tile's absolute row range and, per expert segment in it, the expert id, its row count
    and whether it is that expert's first segment (later ones accumulate weight grads).
    An expert is split (into near-equal chunks) only beyond 2 * rows rows: every chunk
    streams the expert's weights from memory again."""
    rows = rows or TILE_ROWS
    tiles, seg, start, pos = [], ([], [], []), 0, 0

    def close():
        """End the current tile (if it has segments) and start the next at `pos`."""
        nonlocal seg, start
        if seg[0]:
            tiles.append((start, pos, *seg))
        seg, start = ([], [], []), pos

    for e, c in enumerate(counts):
        if c == 0:
            continue
        if pos - start + c > rows:
            close()
        chunks = -(-c // (2 * rows))
        for j in range(chunks):
            if j:
                close()
            n = c * (j + 1) // chunks - c * j // chunks
            for lst, v in zip(seg, (e, n, j == 0)):
                lst.append(v)
            pos += n
    close()
    return tiles


def _grouped_mm_offsets(x, gate_up, down, counts, tiles):
    """(E,) int32 cumulative rows per expert if torch._grouped_mm should run the GEMMs, else None.

    _grouped_mm loops over experts in C++, saving the per-expert python overhead that shows
    in decode.  It returns fresh outputs (page faults on big ones, see TILE_ROWS), so it is
    used only when all rows fit in one tile of <= TILE_ROWS rows; on CPU it needs fp32/bf16/
    fp16 with 16-byte aligned rows and data.  Other devices keep the loop (CUDA restricts
    its dtypes)."""
    if len(tiles) != 1 or tiles[0][1] > TILE_ROWS or x.device.type != "cpu":
        return None
    if not hasattr(torch, "_grouped_mm"):
        return None
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    step = 16 // x.element_size()
    if x.shape[1] % step or down.shape[2] % step or not (gate_up.is_contiguous() and down.is_contiguous()):
        return None
    if gate_up.data_ptr() % 16 or down.data_ptr() % 16:
        return None
    return torch.tensor(counts, dtype=torch.int32).cumsum_(0, dtype=torch.int32)


def _forward(x, gate_up, down, tok, w, counts, tiles, keep_gate_up: bool = False):
    """Expert forward on expert-sorted assignments, tile by tile.

    x (T, H), gate_up (E, 2I, H), down (E, H, I), tok (N,) int64 token of each sorted row,
    w (N,) its routing weight, all float tensors of one dtype; counts, tiles from _route.
    Returns out (T, H) and, if keep_gate_up, the (N, 2I) gate/up GEMM output (else None).
    """
    inter, hid = down.shape[2], x.shape[1]
    rows = max((t - s for s, t, *_ in tiles), default=0)
    offs = _grouped_mm_offsets(x, gate_up, down, counts, tiles)
    xs, act, y = x.new_empty(rows, hid), x.new_empty(rows, inter), x.new_empty(rows, hid)
    gu = x.new_empty(tok.numel() if keep_gate_up else rows, 2 * inter) if offs is None else None
    wcol, scale_act = w.unsqueeze(1), inter <= hid  # weight the smaller of (n, I) / (n, H)
    out = x.new_zeros(x.shape)
    for s, t, experts, sizes, _ in tiles:
        n = t - s
        xt = torch.index_select(x, 0, tok[s:t], out=xs[:n])
        if offs is not None:
            h = gu = torch._grouped_mm(xt, gate_up.transpose(1, 2), offs=offs)
        else:
            h = gu[s:t] if keep_gate_up else gu[:n]
            for e, x_e, h_e in zip(experts, xt.split(sizes), h.split(sizes)):
                torch.mm(x_e, gate_up[e].t(), out=h_e)
        a = torch.ops.aten.silu.out(h[:, :inter], out=act[:n]).mul_(h[:, inter:])  # silu(g) * u
        if scale_act:
            a.mul_(wcol[s:t])
        if offs is not None:
            y_t = torch._grouped_mm(a, down.transpose(1, 2), offs=offs)
        else:
            y_t = y[:n]
            for e, a_e, y_e in zip(experts, a.split(sizes), y_t.split(sizes)):
                torch.mm(a_e, down[e].t(), out=y_e)
        if not scale_act:
            y_t.mul_(wcol[s:t])
        out.index_add_(0, tok[s:t], y_t)
    return out, (gu if keep_gate_up else None)


class _FusedExperts(torch.autograd.Function):
    """Autograd wrapper.  Forward keeps the (N, 2I) gate/up GEMM output (N*2I floats): the
    alternative, recomputing it in backward, costs 1/3 more backward GEMM flops."""

    @staticmethod
    def forward(ctx, x, gate_up, down, top_k_index, top_k_weights):
        """Same tensors as fused_experts (x and top_k_weights already in the weights' dtype)."""
        perm, tok, w, counts, tiles = _route(top_k_index, top_k_weights, gate_up.shape[0])
        out, gu = _forward(x, gate_up, down, tok, w, counts, tiles, keep_gate_up=True)
        ctx.save_for_backward(x, gate_up, down, perm, tok, w, gu)
        ctx.counts, ctx.tiles, ctx.k_shape = counts, tiles, top_k_weights.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        """grad_out (T, H) -> grads (T, H), (E, 2I, H), (E, H, I), None, (T, K); each weight
        gradient is one stacked tensor, written expert by expert (zeros for idle experts)."""
        x, gate_up, down, perm, tok, w, gu = ctx.saved_tensors
        need_x, need_gu, need_dn, _, need_w = ctx.needs_input_grad
        tiles, inter, hid = ctx.tiles, down.shape[2], x.shape[1]
        rows = max((t - s for s, t, *_ in tiles), default=0)
        grad_out = grad_out.to(x.dtype)
        grad_x = x.new_zeros(x.shape) if need_x else None
        grad_gu = _stacked_grad(gate_up, ctx.counts) if need_gu else None
        grad_dn = _stacked_grad(down, ctx.counts) if need_dn else None
        dw = w.new_empty(tok.numel()) if need_w else None
        gy, xs, d_gu = x.new_empty(rows, hid), x.new_empty(rows, hid), x.new_empty(rows, 2 * inter)
        p, silu, a = (x.new_empty(rows, inter) for _ in range(3))
        for s, t, experts, sizes, firsts in tiles:
            n, g, u, wcol = t - s, gu[s:t, :inter], gu[s:t, inter:], w[s:t, None]
            gy_t, p_t, a_t, d_t = gy[:n], p[:n], a[:n], d_gu[:n]
            torch.index_select(grad_out, 0, tok[s:t], out=gy_t)  # (n, H)
            for e, gy_e, p_e in zip(experts, gy_t.split(sizes), p_t.split(sizes)):
                torch.mm(gy_e, down[e], out=p_e)  # p = dL/d(w * a), a = silu(g) * u
            sl = torch.ops.aten.silu.out(g, out=silu[:n])
            q = torch.mul(p_t, u, out=d_t[:, :inter])  # p * u, becomes dL/dg below
            if need_w:  # dL/dw = <a @ down^T, gy> = <p, silu(g) * u>
                torch.linalg.vecdot(q, sl, out=dw[s:t])
            sl.mul_(wcol)  # w * silu(g)
            if need_dn:  # dL/ddown[e] = gy^T @ (w * a)
                torch.mul(sl, u, out=a_t)
                for e, f, gy_e, a_e in zip(experts, firsts, gy_t.split(sizes), a_t.split(sizes)):
                    _mm_acc(gy_e.t(), a_e, grad_dn[e], f)
            if not (need_x or need_gu):
                continue
            # dL/dg = w * p * u * silu'(g), silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g)
            torch.ops.aten.silu_backward.grad_input(q, g, grad_input=q).mul_(wcol)
            torch.mul(p_t, sl, out=d_t[:, inter:])  # dL/du = w * p * silu(g)
            if need_gu:  # dL/dgate_up[e] = d_gu^T @ xs
                xt = torch.index_select(x, 0, tok[s:t], out=xs[:n])
                for e, f, d_e, x_e in zip(experts, firsts, d_t.split(sizes), xt.split(sizes)):
                    _mm_acc(d_e.t(), x_e, grad_gu[e], f)
            if need_x:  # gy is consumed: reuse it for dL/dxs = d_gu @ gate_up[e]
                for e, d_e, gy_e in zip(experts, d_t.split(sizes), gy_t.split(sizes)):
                    torch.mm(d_e, gate_up[e], out=gy_e)
                grad_x.index_add_(0, tok[s:t], gy_t)
        grad_w = None
        if need_w:
            grad_w = w.new_zeros(ctx.k_shape.numel()).index_copy_(0, perm, dw).view(ctx.k_shape)
        return grad_x, grad_gu, grad_dn, None, grad_w


def _stacked_grad(weight, counts):
    """Uninitialised stacked gradient like weight (E, ...); experts without rows are zeroed,
    the others are fully written by their first segment."""
    grad = torch.empty_like(weight, memory_format=torch.contiguous_format)
    for e, c in enumerate(counts):
        if c == 0:
            grad[e].zero_()
    return grad


def _mm_acc(a, b, out, first: bool):
    """out = a @ b on an expert's first segment, out += a @ b after."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def fused_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights) -> torch.Tensor:
    """Mixture-of-experts FFN over the assignments served here.

    hidden_states (T, H) float; gate_up_proj (E, 2I, H) (rows :I gate, I: up); down_proj
    (E, H, I); top_k_index (T, K) int64/int32, entries < 0 are skipped; top_k_weights (T, K)
    float.  Returns (T, H) in hidden_states.dtype:
    out[t] = sum_k w[t,k] * down[e] @ (silu(g) * u), (g, u) = (gate_up[e] @ x[t]).chunk(2),
    e = top_k_index[t, k] >= 0.  Differentiable in hidden_states, both weights and top_k_weights.
    """
    if hidden_states.is_cuda:
        return _gpu_fused_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)
    out_dtype = hidden_states.dtype
    x = hidden_states.to(gate_up_proj.dtype)
    w = top_k_weights.to(gate_up_proj.dtype)
    tensors = (x, gate_up_proj, down_proj, w)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedExperts.apply(x, gate_up_proj, down_proj, top_k_index, w).to(out_dtype)
    _, tok, ws, counts, tiles = _route(top_k_index, w, gate_up_proj.shape[0])
    return _forward(x, gate_up_proj, down_proj, tok, ws, counts, tiles)[0].to(out_dtype)


def _gpu_fused_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    """On CUDA: the Triton kernels, or torch._grouped_mm where the tuned table found it faster."""
    from moecluster.workers.grouped_mm_experts import grouped_mm_experts, grouped_mm_supported
    from moecluster.workers.kernel_tuning import device_name, pick_config
    from moecluster.workers.triton_experts import triton_fused_experts

    e, inter, hid = gate_up_proj.shape[0], down_proj.shape[2], hidden_states.shape[1]
    config = pick_config(e, inter, hid, hidden_states.shape[0], gate_up_proj.dtype, device_name(hidden_states.device),
                         top_k=top_k_index.shape[1])
    if config["backend"] == "grouped_mm" and grouped_mm_supported(hidden_states, gate_up_proj, down_proj):
        return grouped_mm_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)
    return triton_fused_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, config=config)


def reference_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights) -> torch.Tensor:
    """Per-expert python loop, exactly transformers' eager MixtralExperts.forward, skipping
    negative indices.  Same shapes/dtypes as fused_experts; for tests and benchmarks."""
    out = torch.zeros_like(hidden_states)
    for e in range(gate_up_proj.shape[0]):
        slot, token_idx = torch.where(top_k_index.t() == e)  # eager's (slot, token) order
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(hidden_states[token_idx], gate_up_proj[e]).chunk(2, dim=-1)
        cur = F.linear(F.silu(gate) * up, down_proj[e]) * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, cur.to(out.dtype))
    return out
