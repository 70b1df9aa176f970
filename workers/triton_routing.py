"""Routing metadata for the Triton expert kernels: assignments sorted by expert, each expert's
rows padded to whole M-blocks in the index space only (vLLM's moe_align_block_size).

Everything stays on the device with no host sync, so a decode step can be captured in a
CUDA graph: rows are allocated for the worst case and blocks past the used rows exit early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["ALIGN_CHUNKS_MAX", "ALIGN_KERNEL_MAX", "Routing", "align"]


@dataclass
class Routing:
    """Expert-sorted, block-padded assignment order; all tensors stay on the device (no sync).

    sorted_ids (R,) int32: assignment id (t*K + k) per row, `n` (= T*K) in padding rows;
    block_expert (R // block_m,) int32: expert of each M-block, E past the last used block;
    rows_used (1,) int32: padded row count actually used; pad_start, padded (E,) int32:
    each expert's first row and padded row count."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    rows_used: torch.Tensor
    pad_start: torch.Tensor
    padded: torch.Tensor
    block_m: int
    n: int


ALIGN_KERNEL_MAX = 4096  # assignments up to which one Triton program does the routing (decode, small batches)
ALIGN_CHUNKS_MAX = 1 << 20  # and up to which three Triton launches over chunks of assignments do it
ALIGN_CHUNK_MIN = 1024  # assignments per chunk, at least (at most 128 chunks)


def align(top_k_index: torch.Tensor, num_experts: int, block_m: int, method: str | None = None) -> Routing:
    """vLLM's moe_align_block_size without a host sync: rows are allocated for the worst case
    (every expert wastes block_m - 1 rows) and unused blocks exit early.  method "kernel"
    (default up to ALIGN_KERNEL_MAX assignments) runs one Triton program, about 30 fewer
    launches than "torch", which is what decode latency is made of; "chunks" (default up to
    ALIGN_CHUNKS_MAX) three launches: per-chunk histograms, one scan, a per-chunk sort and scatter."""
    n = top_k_index.numel()
    if method is None:
        method = "kernel" if 0 < n <= ALIGN_KERNEL_MAX else "chunks" if 0 < n <= ALIGN_CHUNKS_MAX else "torch"
    if method == "kernel":
        return _align_kernel_path(top_k_index, num_experts, block_m)
    if method == "chunks":
        return _align_chunks_path(top_k_index, num_experts, block_m)
    return _align_torch(top_k_index, num_experts, block_m)


def _worst_case_rows(n: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m


def _align_kernel_path(top_k_index, num_experts, block_m) -> Routing:
    n, dev = top_k_index.numel(), top_k_index.device
    rows = _worst_case_rows(n, num_experts, block_m)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(rows // block_m, dtype=torch.int32, device=dev)
    meta = torch.empty(1 + 3 * num_experts, dtype=torch.int32, device=dev)  # rows_used, pad_start, padded, start
    block_e = triton.next_power_of_2(num_experts + 1)
    _align_kernel[(1,)](top_k_index.reshape(-1), sorted_ids, block_expert, meta, n, num_experts, rows,
                        BLOCK_M=block_m, BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_E=block_e, BLOCK_B=256,
                        num_warps=8 if n > 1024 else 4)
    return Routing(sorted_ids, block_expert, meta[:1], meta[1:1 + num_experts],
                   meta[1 + num_experts:1 + 2 * num_experts], block_m, n)


def _align_chunks_path(top_k_index, num_experts, block_m) -> Routing:
    n, dev = top_k_index.numel(), top_k_index.device
    chunk = max(ALIGN_CHUNK_MIN, triton.next_power_of_2(triton.cdiv(n, 128)))
    num_chunks = max(1, triton.cdiv(n, chunk))
    rows = _worst_case_rows(n, num_experts, block_m)
    block_e = triton.next_power_of_2(num_experts + 1)
    flat = top_k_index.reshape(-1)
    hist = torch.empty(num_chunks, block_e, dtype=torch.int32, device=dev)  # then each (chunk, expert)'s row base
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(rows // block_m, dtype=torch.int32, device=dev)
    meta = torch.empty(1 + 2 * num_experts, dtype=torch.int32, device=dev)  # rows_used, pad_start, padded
    _chunk_hist_kernel[(num_chunks,)](flat, hist, n, num_experts, CHUNK=chunk, BLOCK_E=block_e)
    _chunk_scan_kernel[(1,)](hist, sorted_ids, block_expert, meta, n, num_experts, rows, num_chunks,
                             BLOCK_M=block_m, BLOCK_C=triton.next_power_of_2(num_chunks), BLOCK_E=block_e,
                             BLOCK_B=256, BLOCK_R=1024, num_warps=8)
    _chunk_scatter_kernel[(num_chunks,)](flat, hist, sorted_ids, n, num_experts, CHUNK=chunk, BLOCK_E=block_e,
                                         num_warps=8)
    return Routing(sorted_ids, block_expert, meta[:1], meta[1:1 + num_experts],
                   meta[1 + num_experts:1 + 2 * num_experts], block_m, n)


def _align_torch(top_k_index, num_experts, block_m):
    flat = top_k_index.reshape(-1)
    n, dev = flat.numel(), flat.device
    key = torch.where(flat >= 0, flat, num_experts).int()  # not served here: sorts last, dropped
    order = torch.argsort(key, stable=True)  # 32-bit keys: half the radix passes of int64
    e_sorted = key[order]
    # each expert's first sorted position, by binary search (no scatter_add onto E counters,
    # whose atomics serialise over a large batch; no bincount: it syncs)
    start = torch.searchsorted(e_sorted, torch.arange(num_experts + 1, device=dev, dtype=torch.int32))
    counts, start = start[1:] - start[:-1], start[:-1]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    rows = _worst_case_rows(n, num_experts, block_m)
    e_c = e_sorted.clamp(max=num_experts - 1).long()
    dst = pad_start[e_c] + torch.arange(n, device=dev) - start[e_c]
    dst = torch.where(e_sorted < num_experts, dst, rows)  # row `rows` is a dump slot
    sorted_ids = torch.full((rows + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids = sorted_ids.scatter_(0, dst, order.int())[:rows]
    block_starts = torch.arange(0, rows, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, block_starts, right=True).int()
    rows_used = pad_end[-1:].int() if num_experts else torch.zeros(1, dtype=torch.int32, device=dev)
    return Routing(sorted_ids, block_expert, rows_used, pad_start.int(), padded.int(), block_m, n)


@triton.jit
def _align_kernel(idx_ptr, sorted_ids_ptr, block_expert_ptr, meta_ptr, n, E, R,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: histogram, padded offsets, a stable sort by (expert, assignment) and the
    scatter into padded rows.  meta = [rows_used, pad_start (E), padded (E), start (E)]."""
    offs = tl.arange(0, BLOCK_N)
    key = tl.load(idx_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
    key = tl.where(key >= 0, key, E)  # not served (and lanes past n): bin E, sorted last
    bins = tl.arange(0, BLOCK_E)
    e_ok = bins < E
    counts = tl.where(e_ok, tl.histogram(key, BLOCK_E), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, 0)
    tl.store(meta_ptr, tl.sum(padded, 0))
    tl.store(meta_ptr + 1 + bins, pad_end - padded, mask=e_ok)
    tl.store(meta_ptr + 1 + E + bins, padded, mask=e_ok)
    tl.store(meta_ptr + 1 + 2 * E + bins, tl.cumsum(counts, 0) - counts, mask=e_ok)
    for b0 in range(0, R // BLOCK_M, BLOCK_B):  # every row starts as padding; each block gets its expert
        blocks = b0 + tl.arange(0, BLOCK_B)
        b_ok = blocks < R // BLOCK_M
        before = (pad_end[None, :] <= (blocks * BLOCK_M)[:, None]) & e_ok[None, :]
        tl.store(block_expert_ptr + blocks, tl.sum(before.to(tl.int32), 1), mask=b_ok)
        for j in range(BLOCK_M):
            tl.store(sorted_ids_ptr + blocks * BLOCK_M + j, n, mask=b_ok)
    tl.debug_barrier()  # the sentinel fill and the offsets are visible before the scatter below
    ordered = tl.sort(key * BLOCK_N + offs)
    s_key, s_id = ordered // BLOCK_N, ordered % BLOCK_N
    served = s_key < E
    dst = tl.load(meta_ptr + 1 + s_key, mask=served, other=0) + offs - tl.load(meta_ptr + 1 + 2 * E + s_key,
                                                                                mask=served, other=0)
    tl.store(sorted_ids_ptr + dst, s_id, mask=served)


@triton.jit
def _chunk_keys(idx_ptr, c, n, E, CHUNK: tl.constexpr):
    """Expert of each assignment of chunk c; not served (and lanes past n): E."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    key = tl.load(idx_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
    return tl.where(key >= 0, key, E)


@triton.jit
def _chunk_hist_kernel(idx_ptr, hist_ptr, n, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """hist[c, e]: assignments of chunk c on expert e (bin E: not served)."""
    c = tl.program_id(0)
    key = _chunk_keys(idx_ptr, c, n, E, CHUNK)
    tl.store(hist_ptr + c * BLOCK_E + tl.arange(0, BLOCK_E), tl.histogram(key, BLOCK_E))


@triton.jit
def _chunk_scan_kernel(hist_ptr, sorted_ids_ptr, block_expert_ptr, meta_ptr, n, E, R, num_chunks,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """One program: expert totals, padded offsets and meta = [rows_used, pad_start (E), padded (E)];
    hist[c, e] becomes the row base of chunk c's expert-e assignments: pad_start[e] + the same
    expert's count in earlier chunks - the chunk's count of lower experts (an assignment's row is
    base + its position in the chunk sorted by expert); each block's expert; the sentinel n in
    every padding row (the scatter writes the others)."""
    cs = tl.arange(0, BLOCK_C)
    bins = tl.arange(0, BLOCK_E)
    e_ok = bins < E
    h_ptrs = hist_ptr + cs[:, None] * BLOCK_E + bins[None, :]
    h = tl.load(h_ptrs, mask=(cs < num_chunks)[:, None] & e_ok[None, :], other=0)
    counts = tl.sum(h, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, 0)
    pad_start = pad_end - padded
    rows_used = tl.sum(padded, 0)
    tl.store(meta_ptr, rows_used)
    tl.store(meta_ptr + 1 + bins, pad_start, mask=e_ok)
    tl.store(meta_ptr + 1 + E + bins, padded, mask=e_ok)
    base = pad_start[None, :] + (tl.cumsum(h, 0) - h) - (tl.cumsum(h, 1) - h)
    tl.store(h_ptrs, base, mask=(cs < num_chunks)[:, None])
    for b0 in range(0, R // BLOCK_M, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        before = (pad_end[None, :] <= (blocks * BLOCK_M)[:, None]) & e_ok[None, :]
        tl.store(block_expert_ptr + blocks, tl.sum(before.to(tl.int32), 1), mask=blocks < R // BLOCK_M)
    pad_rows = (pad_start + counts)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_ids_ptr + pad_rows, n, mask=(pad_rows < pad_end[:, None]) & e_ok[:, None])
    for r0 in range(rows_used, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        tl.store(sorted_ids_ptr + r, n, mask=r < R)


@triton.jit
def _chunk_scatter_kernel(idx_ptr, base_ptr, sorted_ids_ptr, n, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Chunk c sorted stably by expert; each served assignment to its row, base[c, e] + its position."""
    c = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    key = _chunk_keys(idx_ptr, c, n, E, CHUNK)
    ordered = tl.sort(key * CHUNK + local)
    s_key, s_local = ordered // CHUNK, ordered % CHUNK
    served = s_key < E
    dst = tl.load(base_ptr + c * BLOCK_E + s_key, mask=served, other=0) + local
    tl.store(sorted_ids_ptr + dst, c * CHUNK + s_local, mask=served)
