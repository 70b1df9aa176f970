"""Concurrent Forward requests through a whole local cluster: computed together at the frontend vs each alone.

    python bench/forward_batching.py [--clients 1 4 16 32] [--tokens 4 16] [--seconds 5] [--rounds 2]

`moectl up` starts a cluster (2 workers); two more frontends join its controller and workers: one computes
the Forward requests that arrive while it is busy as one forward (the default, frontend/forward_batcher.py),
the other each request alone (`--forward-batch-tokens 0`). Both keep the workers' own batching. N clients
in a closed loop send one row of T tokens (T varied by up to 3 around `--tokens`), on one frontend at a time,
the two alternating for `--rounds` rounds. Prints requests/s, p50/p99 latency, the ratio together / alone,
the mean batch (from the frontend's /metrics), and every answer checked against transformers' forward of
that row alone (the worst error; wrong: over 1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from moecluster import Client  # noqa: E402
from moecluster.observability.prometheus import parse  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_generation", Path(__file__).with_name("generation.py"))
generation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generation)

TOLERANCE = 1e-4


def closed_loop(address: str, clients: int, seconds: float, prompts: list[torch.Tensor], expected: list[torch.Tensor]
                ) -> dict:
    latencies, errors, worst = [], [], [0.0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(n: int):
        c, i = Client(address, timeout=120), n
        while time.monotonic() < stop:
            k = i % len(prompts)
            start = time.perf_counter()
            try:
                logits = c.forward(prompts[k])
            except Exception as err:  # noqa: BLE001 - counted
                with lock:
                    errors.append(repr(err))
                continue
            elapsed = time.perf_counter() - start
            error = (logits - expected[k]).abs().max().item()
            with lock:
                latencies.append(elapsed)
                worst[0] = max(worst[0], error)
                if error > TOLERANCE:
                    errors.append(f"prompt {k}: max abs error {error:.3g}")
            i += clients

    with futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return {"latencies": latencies, "errors": errors, "worst": worst[0]}


def batches(metrics: str) -> tuple[float, float]:
    """(forwards, requests they answered) from a frontend's /metrics."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
        samples = {name: value for name, labels, value in parse(reply.read().decode())}
    return samples["moecluster_frontend_forward_batches_total"], samples["moecluster_frontend_batched_forwards_total"]


def serving_model(env: dict, path: Path) -> torch.nn.Module:
    """The serving benches' checkpoint (qwen3_moe H=1024, I=384, E=64, top-8, 2 layers, vocab 512) made at `path`;
    transformers' model of it, the reference."""
    generation.moectl(env, "model", "create", "--family", "qwen3_moe", "--out", str(path), "--layers", "2",
                      "--hidden", "1024", "--intermediate", "384", "--experts", "64", "--top-k", "8", "--vocab", "512")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 16], help="tokens a request, about")
    parser.add_argument("--seconds", type=float, default=5.0, help="per row, frontend and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="moecluster-bench-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MOECLUSTER_HOME": str(tmp / "home"), "TRANSFORMERS_VERBOSITY": "error"}
        model = tmp / "model"
        reference = serving_model(env, model)
        gen = torch.Generator().manual_seed(0)
        prompts = {t: [torch.randint(0, 512, (1, max(1, t - 3 + i % 4)), generator=gen) for i in range(32)]
                   for t in args.tokens}
        with torch.no_grad():
            expected = {t: [reference(input_ids=p).logits.float() for p in rows] for t, rows in prompts.items()}
        generation.moectl(env, "up", "--model", str(model), "--workers", "2", "--port", "0", "--detach",
                          "--name", "bench")
        frontends = []
        try:
            controller = json.loads(generation.moectl(env, "status", "--name", "bench", "-o", "json"))["controller"]
            addresses, metrics = {}, {}
            for name, extra in (("together", []), ("alone", ["--forward-batch-tokens", "0"])):
                proc, addresses[name] = generation.start_frontend(model, controller, tmp,
                                                                  ["--metrics-port", "0", *extra], name=name)
                frontends.append(proc)
                metrics[name] = json.loads((tmp / f"frontend-{name}.ready").read_text())["metrics"]
            for address in addresses.values():  # warm both
                closed_loop(address, 2, 1.0, prompts[args.tokens[0]], expected[args.tokens[0]])
            for _ in range(args.rounds):
                for tokens in args.tokens:
                    for clients in args.clients:
                        for name, address in addresses.items():
                            before = batches(metrics[name])
                            run = closed_loop(address, clients, args.seconds, prompts[tokens], expected[tokens])
                            after = batches(metrics[name])
                            row = results.setdefault((tokens, clients, name), {
                                "latencies": [], "errors": [], "seconds": 0.0, "worst": 0.0, "forwards": 0.0,
                                "requests": 0.0})
                            row["latencies"] += run["latencies"]
                            row["errors"] += run["errors"]
                            row["seconds"] += args.seconds
                            row["worst"] = max(row["worst"], run["worst"])
                            row["forwards"] += after[0] - before[0]
                            row["requests"] += after[1] - before[1]
        finally:
            for proc in frontends:
                proc.terminate()
                proc.wait(timeout=30)
            generation.moectl(env, "down", "--name", "bench")
    print("a local cluster, 2 workers: qwen3_moe H=1024, I=384, E=64, top-8, 2 layers, vocab 512; "
          f"{args.rounds} x {args.seconds:.0f} s per row, the two frontends alternating")
    print(f"{'tokens':>6} {'clients':>7} {'frontend':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'batch':>5} "
          f"{'failed':>6} {'worst err':>9} {'vs alone':>8}")
    for tokens in args.tokens:
        for clients in args.clients:
            rates = {}
            for name in ("alone", "together"):
                row = results[(tokens, clients, name)]
                lat = sorted(row["latencies"])
                rates[name] = len(lat) / row["seconds"]
                p50, p99 = statistics.median(lat) * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3
                batch = row["requests"] / row["forwards"] if row["forwards"] else float("nan")
                print(f"{tokens:>6} {clients:>7} {name:>9} {rates[name]:>7.1f} {p50:>7.1f} {p99:>7.1f} {batch:>5.1f} "
                      f"{len(row['errors']):>6} {row['worst']:>9.2g} {rates[name] / rates['alone']:>7.2f}x")


if __name__ == "__main__":
    main()
