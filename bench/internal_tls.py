"""What mutual TLS between a cluster's parts costs: the same local cluster with and without `--internal-tls`.

    python bench/internal_tls.py [--clients 1 4 16] [--tokens 16] [--seconds 5] [--rounds 2]

Two clusters of 2 workers on one checkpoint, one started with `moectl up --internal-tls` (every call between
frontend, controller and workers over mutual TLS) and one without. N clients in a closed loop send Forward
requests of about T tokens to one cluster at a time, the two alternating for `--rounds` rounds; then each
scales 2 -> 3 -> 2 (a worker starts, experts are copied to it and away: gRPC calls and bulk copies), timed.
Prints requests/s and p50/p99 latency with and without TLS, their ratio, the scale times, and every answer
checked against transformers' forward (the worst error; wrong: over 1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generation, forward_batching = _load("generation"), _load("forward_batching")
CLUSTERS = {"plaintext": [], "mutual TLS": ["--internal-tls"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=16, help="tokens a request, about")
    parser.add_argument("--seconds", type=float, default=5.0, help="per row, cluster and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results, scales = {}, {name: [] for name in CLUSTERS}
    with tempfile.TemporaryDirectory(prefix="moecluster-bench-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MOECLUSTER_HOME": str(tmp / "home"), "TRANSFORMERS_VERBOSITY": "error"}
        model = tmp / "model"
        reference = forward_batching.serving_model(env, model)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 512, (1, max(1, args.tokens - 3 + i % 4)), generator=gen) for i in range(32)]
        with torch.no_grad():
            expected = [reference(input_ids=p).logits.float() for p in prompts]
        endpoints = {}
        try:
            for i, (name, flags) in enumerate(CLUSTERS.items()):
                generation.moectl(env, "up", "--model", str(model), "--workers", "2", "--port", "0", "--detach",
                                  "--name", f"c{i}", *flags)
                endpoints[name] = json.loads(generation.moectl(env, "status", "--name", f"c{i}", "-o", "json"))["endpoint"]
            for endpoint in endpoints.values():  # warm both
                forward_batching.closed_loop(endpoint, 2, 1.0, prompts, expected)
            for _ in range(args.rounds):
                for clients in args.clients:
                    for name, endpoint in endpoints.items():
                        run = forward_batching.closed_loop(endpoint, clients, args.seconds, prompts, expected)
                        row = results.setdefault((clients, name), {"latencies": [], "errors": [], "worst": 0.0})
                        row["latencies"] += run["latencies"]
                        row["errors"] += run["errors"]
                        row["worst"] = max(row["worst"], run["worst"])
                for i, name in enumerate(CLUSTERS):
                    for workers in (3, 2):
                        start = time.perf_counter()
                        generation.moectl(env, "scale", "--name", f"c{i}", "--workers", str(workers))
                        scales[name].append(time.perf_counter() - start)
        finally:
            for i in range(len(CLUSTERS)):
                generation.moectl(env, "down", "--name", f"c{i}")
    print(f"two local clusters, 2 workers each: qwen3_moe H=1024, I=384, E=64, top-8, 2 layers; Forward of about "
          f"{args.tokens} tokens; {args.rounds} x {args.seconds:.0f} s per row, the two alternating")
    print(f"{'clients':>7} {'internal calls':>14} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'failed':>6} {'worst err':>9} "
          f"{'vs plain':>8}")
    for clients in args.clients:
        rates = {}
        for name in CLUSTERS:
            row = results[(clients, name)]
            lat = sorted(row["latencies"])
            rates[name] = len(lat) / (args.seconds * args.rounds)
            p50, p99 = statistics.median(lat) * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3
            print(f"{clients:>7} {name:>14} {rates[name]:>7.1f} {p50:>7.1f} {p99:>7.1f} {len(row['errors']):>6} "
                  f"{row['worst']:>9.2g} {rates[name] / rates['plaintext']:>7.2f}x")
    for name, times in scales.items():
        ups, downs = times[0::2], times[1::2]
        print(f"scale 2 -> 3 -> 2, {name}: {statistics.median(ups):.2f} s up, {statistics.median(downs):.2f} s down "
              f"(median of {len(ups)}, `moectl scale` wall time)")


if __name__ == "__main__":
    main()
