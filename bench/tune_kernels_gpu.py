"""Tune the Triton expert kernels on this GPU and write `workers/tuned/*.json` (kernel_tuning's tables).

    python bench/tune_kernels_gpu.py --shape mixtral qwen3 [--tokens 1 16 256 8192] [--out DIR]
    python bench/tune_kernels_gpu.py --custom E I H K ...

Per token count: for each BLOCK_M candidate, a coordinate search over each kernel's
(BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), with and without TMA loads (and the
gathered A operand), timing the whole forward (or, for the backward kernels,
forward+backward), then the best BLOCK_M; for decode sizes, the routing-free decode kernels
are searched too and kept if faster; finally torch._grouped_mm's forward is timed and the
entry's "backend" names the faster path.  The weight gradients may go to torch._grouped_mm.
bf16, CUDA-event medians;
decode-sized forwards are replayed from CUDA graphs (as a server runs them, so Python's
launch overhead stays out), the rest runs eagerly.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/kernels.py is not `kernels`

import torch  # noqa: E402
from moecluster.workers import kernel_tuning  # noqa: E402
from moecluster.workers.grouped_mm_experts import grouped_mm_experts, grouped_mm_supported  # noqa: E402
from moecluster.workers.triton_experts import triton_fused_experts  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

SHAPES = {"mixtral": (8, 14336, 4096, 2), "qwen3": (128, 768, 2048, 8)}  # E, I, H, K
# the prefill size first: with a --budget-s, it is what the goals are measured on
TOKENS = {"mixtral": [8192, 1, 16, 64, 1024], "qwen3": [32768, 1, 16, 64, 1024, 4096]}

def _gemm(rows):
    return [dict(BLOCK_N=n, BLOCK_K=k, GROUP_M=g, num_warps=w, num_stages=s) for n, k, g, w, s in rows]


# (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); gate_up's BLOCK_N is per accumulator (gate and up)
DECODE_CANDIDATES = _gemm([(32, 64, 1, 4, 4), (64, 64, 1, 4, 4), (64, 128, 1, 4, 4), (128, 64, 1, 4, 4),
                           (64, 128, 1, 4, 5), (32, 128, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 3)])
PREFILL_CANDIDATES = _gemm([(64, 64, 8, 4, 3), (128, 64, 8, 8, 3), (128, 64, 8, 4, 4), (64, 128, 8, 8, 3),
                            (128, 128, 8, 8, 3), (256, 64, 8, 8, 3), (128, 64, 16, 8, 4), (64, 64, 8, 8, 4),
                            (128, 32, 8, 4, 4)])
# TMA descriptor loads (GATHER: gate_up's x and grad_act's dy gathered into sorted order first)
PREFILL_CANDIDATES += [dict(c, TMA=True) for c in PREFILL_CANDIDATES[:8]] + \
    [dict(c, TMA=True, GATHER=True) for c in _gemm([(128, 64, 8, 8, 3), (128, 64, 16, 8, 4), (64, 64, 8, 8, 4)])]
# the routing-free decode kernels (kernel_tuning's "decode" entry): a coordinate search from DECODE_START
DECODE_START = dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=4, DOWN_BLOCK_N=4, DOWN_BLOCK_K=256, down_warps=8)
DECODE_AXES = [("BLOCK_N", (8, 32)), ("BLOCK_K", (256, 1024)), ("num_warps", (8,)), ("DOWN_BLOCK_N", (2, 8, 16)),
               ("DOWN_BLOCK_K", (128, 512)), ("down_warps", (4,))]
# (BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages): BLOCK_R rows is the reduction step of the weight gradients
GRAD_W_CANDIDATES = [
    dict(BLOCK_N=n, BLOCK_K=k, BLOCK_R=r, num_warps=w, num_stages=s)
    for n, k, r, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3),
                          (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 2)]
] + [dict(BLOCK_N=128, BLOCK_K=128, BLOCK_R=64, num_warps=8, num_stages=3, backend="grouped_mm")]


def make_case(t, e, i, h, k, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, h, device="cuda", generator=gen).to(dtype)
    gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h**-0.5).to(dtype)
    down = (torch.randn(e, h, i, device="cuda", generator=gen) * i**-0.5).to(dtype)
    w, idx = torch.topk(torch.softmax(torch.randn(t, e, device="cuda", generator=gen), -1), k, -1)
    return x, gate_up, down, idx, (w / w.sum(-1, keepdim=True)).to(dtype)


def timed(fn, graph=False):
    """Median ms (replayed from a CUDA graph if `graph`, as a server runs decode: the launch
    overhead of the Python side is then out of the figure), or inf when the config does
    not fit (shared memory, registers)."""
    try:
        if graph:
            return do_bench_cudagraph(fn, rep=40, return_mode="median")
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as err:  # OutOfResources and compile errors: the config is not viable here
        if "out of resource" not in str(err).lower() and "OutOfResources" not in type(err).__name__:
            print(f"    config failed: {type(err).__name__}: {str(err)[:120]}", file=sys.stderr)
        return float("inf")


def forward_ms(case, cfg, graph):
    with torch.no_grad():
        return timed(lambda: triton_fused_experts(*case, config=cfg), graph=graph)


def train_ms(case, cfg):
    x, gate_up, down, idx, w = [v.detach().requires_grad_(v.is_floating_point()) for v in case]
    grad = torch.randn_like(x)
    return timed(lambda: triton_fused_experts(x, gate_up, down, idx, w, config=cfg).backward(grad))


DEADLINE = [float("inf")]  # time.time() after which searches keep what they have


def search(cfg, kernels, candidates, measure):
    """Coordinate search: each kernel's entry in turn, keeping the best found so far."""
    best = measure(cfg)
    for kernel in kernels:
        for cand in candidates:
            if time.time() > DEADLINE[0]:
                return cfg, best
            trial = copy.deepcopy(cfg)
            trial[kernel] = dict(cand)
            ms = measure(trial)
            if ms < best:
                best, cfg = ms, trial
    return cfg, best


def search_decode(case, cfg):
    """Coordinate search over the decode kernels' parameters (CUDA-graph timed)."""
    best_d = dict(DECODE_START)
    best = forward_ms(case, dict(cfg, decode=best_d), graph=True)
    for key, values in DECODE_AXES:
        for value in values:
            if time.time() > DEADLINE[0]:
                return best_d, best
            trial = dict(best_d, **{key: value})
            ms = forward_ms(case, dict(cfg, decode=trial), graph=True)
            if ms < best:
                best, best_d = ms, trial
    return best_d, best


def retune_backward(e, i, h, k, t, entry):
    """Refine only the backward kernels of an existing entry, over every candidate."""
    case = make_case(t, e, i, h, k)
    cfg = kernel_tuning.default_config(e, t, k, torch.bfloat16, False)
    cfg.update(copy.deepcopy(entry))
    candidates = DECODE_CANDIDATES if t * k / e <= 32 else PREFILL_CANDIDATES
    before = train_ms(case, cfg)
    cfg, ms = search(cfg, ["grad_act", "grad_x"], candidates, lambda c: train_ms(case, c))
    cfg, ms = search(cfg, ["grad_w"], GRAD_W_CANDIDATES, lambda c: train_ms(case, c))
    entry.update({key: cfg[key] for key in ("grad_act", "grad_x", "grad_w")})
    return entry, f"triton fwd+bwd {before:.3f} -> {ms:.3f} ms"


def tune_tokens(e, i, h, k, t, train: bool):
    case = make_case(t, e, i, h, k)
    base = kernel_tuning.default_config(e, t, k, torch.bfloat16, False)
    rows_per_expert = t * k / e
    decode = rows_per_expert <= 32
    candidates = DECODE_CANDIDATES if decode else PREFILL_CANDIDATES
    best_cfg, best_ms = None, float("inf")
    for bm in [16, 32] if decode else [64, 128]:
        cfg = dict(copy.deepcopy(base), BLOCK_M=bm)
        cfg, ms = search(cfg, ["gate_up", "down"], candidates, lambda c: forward_ms(case, c, graph=decode))
        if ms < best_ms:
            best_cfg, best_ms = cfg, ms
    entry = {key: best_cfg[key] for key in ("BLOCK_M", "gate_up", "down")}
    entry["backend"] = "triton"
    report = f"triton fwd {best_ms:.3f} ms"
    if decode:
        dec, dec_ms = search_decode(case, best_cfg)
        if dec_ms < best_ms:
            entry["decode"], best_ms = dec, dec_ms
        report += f", decode kernels {dec_ms:.3f} ms"
    if grouped_mm_supported(*case[:3]):
        with torch.no_grad():
            gmm = timed(lambda: grouped_mm_experts(*case), graph=decode)
        entry["backend"] = "grouped_mm" if gmm < best_ms else "triton"
        report += f", grouped_mm fwd {gmm:.3f} ms"
    if train:
        cfg, ms = search(best_cfg, ["grad_act", "grad_x"], candidates[::2], lambda c: train_ms(case, c))
        cfg, ms = search(cfg, ["grad_w"], GRAD_W_CANDIDATES, lambda c: train_ms(case, c))
        entry.update({key: cfg[key] for key in ("grad_act", "grad_x", "grad_w")})
        report += f", triton fwd+bwd {ms:.3f} ms"
    return entry, report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="*", default=[], choices=sorted(SHAPES))
    parser.add_argument("--custom", nargs=4, type=int, action="append", default=[], metavar=("E", "I", "H", "K"))
    parser.add_argument("--tokens", nargs="*", type=int, help="token counts to tune (default: per shape)")
    parser.add_argument("--train-from", type=int, default=1024,
                        help="also tune the backward kernels for token counts from this one up")
    parser.add_argument("--out", default=str(kernel_tuning.TUNED_DIR), help="directory for the JSON tables")
    parser.add_argument("--backward-only", action="store_true",
                        help="refine the backward kernels of the existing table's entries (for --tokens) only")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="seconds per shape, after which searches keep what they found so far")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tuning needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    jobs = [(name, *SHAPES[name]) for name in args.shape] + [("custom", *c) for c in args.custom]
    if not jobs:
        parser.error("name a --shape or a --custom E I H K")
    for name, e, i, h, k in jobs:
        DEADLINE[0] = time.time() + args.budget_s
        path = os.path.join(args.out, kernel_tuning.table_path(e, i, h, torch.bfloat16, gpu).name)
        table = json.load(open(path)) if args.backward_only else {}
        for t in args.tokens or TOKENS.get(name, [1, 16, 256, 4096]):
            start = time.time()
            if args.backward_only:
                table[str(t)], report = retune_backward(e, i, h, k, t, table[str(t)])
            else:
                table[str(t)], report = tune_tokens(e, i, h, k, t, train=t >= args.train_from)
            print(f"{name} E={e} I={i} H={h} K={k} T={t}: {report} ({time.time() - start:.0f} s)\n  {table[str(t)]}",
                  flush=True)
            torch.cuda.empty_cache()
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
