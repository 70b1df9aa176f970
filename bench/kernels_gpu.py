"""GPU benchmark of the expert kernels: fused_experts vs torch._grouped_mm vs a per-expert loop.

    python bench/kernels_gpu.py [--only mixtral qwen3 decode] [--json PATH] [--profile]

`fused_experts` is timed as a caller gets it (`kernels.fused_experts`, which takes the tuned
table's backend), and each of its rows says what ran: the Triton kernels (with the table's TMA
loads, its torch._grouped_mm weight gradients, or its routing-free decode kernels) or
torch._grouped_mm.  bf16, random softmax+top-k routing, every time a median of CUDA-event timings
(`triton.testing.do_bench`; decode through CUDA graphs where the path has no host sync).
Two ceilings are measured in the same run, an 8192^3 bf16 torch.mm and a device-to-device
copy, and the rates are reported against them and against the datasheet (989 TFLOP/s
bf16 dense and 3.35 TB/s on an H100 SXM).  Not a test: it fails only if the paths
disagree numerically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/kernels.py is not `kernels`

import torch  # noqa: E402
import triton  # noqa: E402
from moecluster.workers.grouped_mm_experts import grouped_mm_experts, grouped_mm_supported  # noqa: E402
from moecluster.workers.kernel_tuning import device_name, pick_config  # noqa: E402
from moecluster.workers.kernels import fused_experts, reference_experts  # noqa: E402
from moecluster.workers.triton_experts import triton_fused_experts  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
PEAK_TBS = {"H100": 3.35, "H200": 4.8}

# name, T, H, I, E, K
PREFILL = [("mixtral", 8192, 4096, 14336, 8, 2), ("qwen3", 32768, 2048, 768, 128, 8)]
DECODE_T = (1, 4, 16, 64)


def make_case(t, h, i, e, k, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, device="cuda", generator=gen).to(dtype)
    gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h**-0.5).to(dtype)
    down = (torch.randn(e, h, i, device="cuda", generator=gen) * i**-0.5).to(dtype)
    probs = torch.softmax(torch.randn(t, e, device="cuda", generator=gen), -1)
    w, idx = torch.topk(probs, k, -1)
    return x, gate_up, down, idx, (w / w.sum(-1, keepdim=True)).to(dtype)


def ceilings():
    """(TFLOP/s of an 8192^3 bf16 mm, TB/s of a 1 GiB device copy counting read + write)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: torch.mm(a, b), warmup=50, rep=300, return_mode="median")
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms_copy = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * 8192**3 / ms / 1e9, 2 * src.numel() * 4 / ms_copy / 1e9


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def what_runs(case, train: bool) -> str:
    """Which path `fused_experts` takes for this case, as its tuned table says."""
    x, gate_up, down, idx, _ = case
    cfg = pick_config(gate_up.shape[0], down.shape[2], x.shape[1], x.shape[0], x.dtype, device_name(x.device),
                      top_k=idx.shape[1])
    if cfg["backend"] == "grouped_mm" and grouped_mm_supported(x, gate_up, down):
        return "grouped_mm"
    if cfg.get("decode") and not train:
        return "triton decode"
    kernels = ("gate_up", "down") + (("grad_act", "grad_x") if train else ())
    tma = [k + ("+gather" if cfg[k].get("GATHER") else "") for k in kernels if cfg[k].get("TMA")]
    wgrad = train and cfg["grad_w"].get("backend") == "grouped_mm"
    return "triton" + (f" tma:{','.join(tma)}" if tma else "") + (" wgrad:grouped_mm" if wgrad else "")


def paths(x, gate_up, down):
    fns = {"fused": fused_experts, "loop": reference_experts}
    if grouped_mm_supported(x, gate_up, down):
        fns["grouped_mm"] = grouped_mm_experts
    return fns


def time_forward(fn, case, graph: bool):
    run = lambda: fn(*case)  # noqa: E731
    with torch.no_grad():
        return do_bench_cudagraph(run, rep=200, return_mode="median") if graph else \
            do_bench(run, warmup=25, rep=200, return_mode="median")


def time_train(fn, case):
    x, gate_up, down, idx, w = [v.detach().requires_grad_(v.is_floating_point()) for v in case]
    grad = torch.randn_like(x)

    def step():
        fn(x, gate_up, down, idx, w).backward(grad)

    return do_bench(step, warmup=25, rep=200, grad_to_none=[x, gate_up, down, w], return_mode="median")


def bench_prefill(name, t, h, i, e, k, peak_mm, peak_sheet, rows):
    case = make_case(t, h, i, e, k)
    fns = paths(*case[:3])
    with torch.no_grad():
        ref = fns["loop"](*case)
        for path, fn in fns.items():
            err = rel(fn(*case), ref)
            assert err < 2e-2, f"{name}: {path} disagrees with the loop (rel {err:.2e})"
    flops = 6 * t * k * h * i
    for path, fn in fns.items():
        fwd = time_forward(fn, case, graph=False)
        train = time_train(fn, case)
        for mode, ms, fl in (("forward", fwd, flops), ("fwd+bwd", train, 3 * flops)):
            tf = fl / ms / 1e9
            ran = what_runs(case, mode == "fwd+bwd") if path == "fused" else path
            rows.append(dict(shape=name, mode=mode, path=path, ran=ran, ms=ms, tflops=tf,
                             pct_peak=100 * tf / peak_sheet, pct_mm=100 * tf / peak_mm))
            print(f"{name:8s} {mode:8s} {path:10s} {ms:9.3f} ms {tf:7.1f} TFLOP/s "
                  f"{100 * tf / peak_sheet:5.1f}% of peak {100 * tf / peak_mm:5.1f}% of mm"
                  + (f"  [{ran}]" if path == "fused" else ""), flush=True)
        torch.cuda.empty_cache()


def bench_decode(name, h, i, e, k, bw_copy, bw_sheet, rows):
    for t in DECODE_T:
        case = make_case(t, h, i, e, k, seed=t)
        active = torch.unique(case[3]).numel()
        nbytes = active * 3 * h * i * 2 + t * h * 2 * 2 + t * k * (4 + 8)  # weights read once, x in, out
        for path, fn in paths(*case[:3]).items():
            ms = time_forward(fn, case, graph=path != "loop")
            tbs = nbytes / ms / 1e9
            ran = what_runs(case, False) if path == "fused" else path
            rows.append(dict(shape=f"{name}-decode", t=t, path=path, ran=ran, ms=ms, tbs=tbs,
                             pct_hbm=100 * tbs / bw_sheet, pct_copy=100 * tbs / bw_copy))
            print(f"{name:8s} decode T={t:<3d} {path:10s} {ms * 1e3:8.1f} us {tbs:5.2f} TB/s "
                  f"{100 * tbs / bw_sheet:5.1f}% of HBM {100 * tbs / bw_copy:5.1f}% of copy"
                  + (f"  [{ran}]" if path == "fused" else ""), flush=True)


def profile(name, t, h, i, e, k):
    """Per-kernel GPU time of one Triton forward+backward (and of a forward alone), from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x, gate_up, down, idx, w = [v.detach().requires_grad_(v.is_floating_point()) for v in make_case(t, h, i, e, k)]
    grad = torch.randn_like(x)
    for _ in range(2):
        triton_fused_experts(x, gate_up, down, idx, w).backward(grad)
    torch.cuda.synchronize()
    x.grad = gate_up.grad = down.grad = w.grad = None  # no gradient accumulation in the profiled step
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        triton_fused_experts(x, gate_up, down, idx, w).backward(grad)
        torch.cuda.synchronize()
    print(f"\nprofile {name} T={t} fwd+bwd")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=["mixtral", "qwen3", "decode"])
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument("--profile", action="store_true", help="print per-kernel times of the Triton path first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels_gpu.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    kind = next((k for k in PEAK_TFLOPS if k in gpu), "H100")
    peak_mm, bw_copy = ceilings()
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"ceilings this run: 8192^3 bf16 mm {peak_mm:.0f} TFLOP/s, copy {bw_copy:.2f} TB/s; "
          f"datasheet {PEAK_TFLOPS[kind]:.0f} TFLOP/s, {PEAK_TBS[kind]} TB/s", flush=True)
    if args.profile:
        for name, t, h, i, e, k in PREFILL:
            profile(name, t, h, i, e, k)
        profile("qwen3", 1, 2048, 768, 128, 8)
    rows = []
    for name, t, h, i, e, k in PREFILL:
        if name in args.only:
            bench_prefill(name, t, h, i, e, k, peak_mm, PEAK_TFLOPS[kind], rows)
    if "decode" in args.only:
        for name, _, h, i, e, k in PREFILL:
            bench_decode(name, h, i, e, k, bw_copy, PEAK_TBS[kind], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=gpu, peak_mm=peak_mm, copy_tbs=bw_copy, rows=rows), f, indent=1)
    print("\ngoals: mixtral fwd >= 60% of peak; qwen3 fwd >= 50%, fwd+bwd >= 40%; decode >= 70% of HBM; "
          "never slower than grouped_mm")
    best = {(r["shape"], r.get("mode"), r.get("t")): {} for r in rows}
    for r in rows:
        best[(r["shape"], r.get("mode"), r.get("t"))][r["path"]] = r["ms"]
    for key, by_path in best.items():
        if "grouped_mm" in by_path:
            print(f"  {key[0]} {key[1] or ''}{'' if key[2] is None else f' T={key[2]}'}: "
                  f"fused_experts/grouped_mm time ratio {by_path['fused'] / by_path['grouped_mm']:.2f}")


if __name__ == "__main__":
    main()
