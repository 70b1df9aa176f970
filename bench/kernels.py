"""Benchmark moecluster.workers.kernels.fused_experts against transformers' experts.

    python bench/kernels.py [--quick] [--only a b ca cb]

Forward (no_grad) of fused_experts vs transformers' MixtralExperts with
``_experts_implementation`` "eager" and "grouped_mm", and forward+backward of
fused_experts vs "eager"; fp32, default thread count, random softmax+top-k routing.
Every number is a median over repetitions after warm-up, all measured in this run.
Not a test: it prints a table and the goals and does not fail on them (it does
fail, before timing, if the implementations disagree numerically).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# This script is named kernels.py, like the optional `kernels` package transformers probes for
# at import time: keep the script's own directory off sys.path so it is not imported as that.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
from moecluster.workers.kernels import fused_experts  # noqa: E402
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

# name (its first word is the --only key), T, H, I, E, K
SHAPES = [
    ("a  T4096 H1024 I384 E64 K8", 4096, 1024, 384, 64, 8),
    ("b  T4096 H768 I1536 E8 K2", 4096, 768, 1536, 8, 2),
    ("ca decode T8, (a) weights", 8, 1024, 384, 64, 8),
    ("cb decode T8, (b) weights", 8, 768, 1536, 8, 2),
]


def median_ms(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median wall time in ms of each fn in `fns` (name -> callable) after `warmup` untimed
    calls each.  Repetitions are interleaved (rotating order) so that load from other
    processes hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_case(t, h, i, e, k, seed=0):
    """MixtralExperts (E, 2I, H)/(E, H, I) fp32 weights, x (T, H), routing (T, K) int64 / fp32."""
    torch.manual_seed(seed)
    experts = MixtralExperts(MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e))
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, h**-0.5)
        experts.down_proj.normal_(0, i**-0.5)
    x = torch.randn(t, h)
    probs = torch.softmax(torch.randn(t, e), dim=-1)
    weights, index = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, x, index, weights


def run_impl(experts, impl, x, index, weights):
    """One forward of transformers' experts with the given implementation name."""
    experts.config._experts_implementation = impl
    return experts(x, index, weights)


def rel(a, b):
    """Norm-wise relative error ||a-b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def gemm_only(x, gate_up, down, index):
    """A callable running only the two GEMMs per expert on rows already sorted by expert,
    into preallocated buffers: the floor for any torch.mm-based implementation."""
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    xs = x[order // index.shape[1]]
    h = x.new_empty(xs.shape[0], gate_up.shape[1])
    a, y = x.new_empty(xs.shape[0], down.shape[2]), torch.empty_like(xs)

    def run():
        for e, x_e, h_e, a_e, y_e in zip(range(len(counts)), *(b.split(counts) for b in (xs, h, a, y))):
            torch.mm(x_e, gate_up[e].t(), out=h_e)
            torch.mm(a_e, down[e].t(), out=y_e)

    return run


def bench_shape(name, t, h, i, e, k, reps, reps_bwd):
    """Forward medians {ours, eager, grouped_mm, gemm}, fwd+bwd medians ours, eager (ms)."""
    experts, x, index, weights = make_case(t, h, i, e, k)
    gu, dn = experts.gate_up_proj, experts.down_proj
    if t <= 64:  # decode: milliseconds per call, afford more repetitions
        reps *= 5
    with torch.no_grad():
        ours = fused_experts(x, gu, dn, index, weights)
        for impl in ("eager", "grouped_mm"):
            err = rel(ours, run_impl(experts, impl, x, index, weights))
            assert err < 1e-5, f"{name}: fused_experts disagrees with {impl}: rel err {err:.2e}"
        fwd = median_ms({
            "ours": lambda: fused_experts(x, gu, dn, index, weights),
            "eager": lambda: run_impl(experts, "eager", x, index, weights),
            "grouped_mm": lambda: run_impl(experts, "grouped_mm", x, index, weights),
            "gemm": gemm_only(x, gu, dn, index),
        }, reps)

    xg = x.clone().requires_grad_(True)
    wg = weights.clone().requires_grad_(True)
    grad_out = torch.randn(t, h)
    params = [xg, wg, gu, dn]

    def train_step(fn):
        for p in params:
            p.grad = None
        fn().backward(grad_out)

    fb_fns = {
        "ours": lambda: train_step(lambda: fused_experts(xg, gu, dn, index, wg)),
        "eager": lambda: train_step(lambda: run_impl(experts, "eager", xg, index, wg)),
    }
    grads = {}
    for impl, fn in fb_fns.items():  # doubles as the warm-up
        fn()
        grads[impl] = [p.grad.clone() for p in params]
    for name, a, b in zip(("hidden", "weights", "gate_up", "down"), grads["ours"], grads["eager"]):
        err = rel(a, b)
        assert err < 1e-4, f"{name}: gradient of fused_experts disagrees with eager: rel err {err:.2e}"
    fb = median_ms(fb_fns, reps_bwd, warmup=0)
    return fwd, fb["ours"], fb["eager"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    keys = [s[0].split()[0] for s in SHAPES]
    parser.add_argument("--only", nargs="+", choices=keys, help="run only these shapes")
    args = parser.parse_args()
    shapes = [s for s in SHAPES if not args.only or s[0].split()[0] in args.only]
    reps, reps_bwd = (3, 1) if args.quick else (7, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, median of {reps} fwd "
          f"(x5 for decode) / {reps_bwd} fwd+bwd reps after warm-up, interleaved")
    print("goal: forward never slower than the best transformers impl on any shape and >= 1.2x on at "
          "least one; forward+backward >= 5x eager")
    print("gemm = only the 2 GEMMs per expert on pre-sorted rows (floor for torch.mm-based code)\n")
    head = (f"{'shape':26} {'ours ms':>8} {'eager ms':>9} {'grp_mm ms':>9} {'gemm ms':>8} {'best/ours':>9}"
            f" | {'fb ours':>8} {'fb eager':>9} {'eager/ours':>10}")
    print(head)
    print("-" * len(head))
    ratios, fb_ratios = [], []
    for shape in shapes:
        fwd, ours_fb, eager_fb = bench_shape(*shape, reps=reps, reps_bwd=reps_bwd)
        ratios.append(min(fwd["eager"], fwd["grouped_mm"]) / fwd["ours"])
        fb_ratios.append(eager_fb / ours_fb)
        print(f"{shape[0]:26} {fwd['ours']:8.2f} {fwd['eager']:9.2f} {fwd['grouped_mm']:9.2f} "
              f"{fwd['gemm']:8.2f} {ratios[-1]:8.2f}x | {ours_fb:8.2f} {eager_fb:9.2f} {fb_ratios[-1]:9.2f}x",
              flush=True)
    print()
    slower = [shapes[j][0].split()[0] for j, r in enumerate(ratios) if r < 1.0]
    short = [shapes[j][0].split()[0] for j, r in enumerate(fb_ratios) if r < 5.0]
    print(f"forward never slower than best: {'met' if not slower else 'NOT met on ' + ', '.join(slower)}"
          f" (min {min(ratios):.2f}x)")
    print(f"forward >= 1.2x on at least one shape: {'met' if max(ratios) >= 1.2 else 'NOT met'}"
          f" (max {max(ratios):.2f}x)")
    print(f"forward+backward >= 5x eager: {'met on all' if not short else 'NOT met on ' + ', '.join(short)}"
          f" (min {min(fb_ratios):.2f}x, max {max(fb_ratios):.2f}x)")


if __name__ == "__main__":
    main()
