"""Concurrent small forwards to one worker: computed together (the default) vs each alone.

    python bench/batching.py [--clients 1 4 8 32] [--compute-threads 2] [--tokens 4] [--seconds 3] [--rounds 2]

Two worker processes hold the same layer (E experts, top-k): one batches the inference
forwards that arrive while a call runs (`--batch-tokens`, default), the other computes
each alone (`--batch-tokens 0`). N client threads each send decode-sized Forward requests
(`--tokens` tokens, a fresh routing each) over gRPC in a closed loop, to one worker at a time;
the two alternate for `--rounds` rounds so that drift hits both alike. Prints requests/s,
p50/p99 latency, the mean batch and the kernel time per second (from the worker's Stats),
and the ratio together / alone, and checks every answer against the in-process `fused_experts`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import grpc  # noqa: E402
import torch  # noqa: E402
from moecluster.models.checkpoint import Checkpoint  # noqa: E402
from moecluster.models.tiny import create_checkpoint  # noqa: E402
from moecluster.protos import worker_pb2, worker_pb2_grpc  # noqa: E402
from moecluster.wire import streaming  # noqa: E402
from moecluster.wire.tensors import decode, encode  # noqa: E402
from moecluster.workers.kernels import fused_experts  # noqa: E402

_spec = importlib.util.spec_from_file_location("dataplane", Path(__file__).with_name("dataplane.py"))
_dataplane = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dataplane)
start_workers, stop_workers = _dataplane.start_workers, _dataplane.stop_workers


def requests_for(n: int, tokens: int, g, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        hidden = torch.randn(tokens, g.hidden, generator=gen)
        weights, ids = torch.softmax(torch.randn(tokens, g.num_experts, generator=gen), -1).topk(g.top_k, dim=-1)
        out.append((hidden, ids, weights))
    return out


def closed_loop(stub, layer: int, clients: int, seconds: float, pool, check) -> dict:
    """`clients` threads send requests from `pool` back to back for `seconds`; latencies and errors."""
    latencies, errors, worst = [], [], [0.0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(n: int):
        i = n
        while time.monotonic() < stop:
            hidden, ids, weights = pool[i % len(pool)]
            message = worker_pb2.ForwardRequest(layer=layer, hidden_states=encode(hidden), top_k_index=encode(ids),
                                                top_k_weights=encode(weights))
            start = time.perf_counter()
            try:
                reply = stub.Forward(message, timeout=60)
            except grpc.RpcError as err:
                with lock:
                    errors.append(err.code())
                continue
            elapsed = time.perf_counter() - start
            error = check(i % len(pool), decode(reply.output))
            with lock:
                latencies.append(elapsed)
                worst[0] = max(worst[0], error)
            i += clients

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "errors": errors, "max_err": worst[0]}


def stats(stub):
    return stub.Stats(worker_pb2.StatsRequest(), timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--tokens", type=int, default=4, help="tokens per request (a decode step of a few sequences)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="per client count, worker and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compute-threads", type=int, default=2, help="the batching worker's --compute-threads")
    parser.add_argument("--threads", type=int, default=0, help="each worker's torch threads (default 0: torch's choice)")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    with tempfile.TemporaryDirectory(prefix="moecluster-bench-") as tmp:
        path = create_checkpoint("qwen3_moe", Path(tmp) / "model", layers=1, hidden=args.hidden,
                                 intermediate=args.intermediate, experts=args.experts, top_k=args.top_k, vocab=64)
        g = Checkpoint(path).geometry
        layer = g.moe_layers[0]
        pairs = [Checkpoint(path).read_expert(layer, e) for e in range(g.num_experts)]
        gate_up, down = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        pool = requests_for(256, args.tokens, g, seed=0)
        with torch.no_grad():
            wanted = [fused_experts(h, gate_up, down, i, w) for h, i, w in pool]

        def check(i: int, output: torch.Tensor) -> float:
            return (output - wanted[i]).abs().max().item()

        placement = {(layer, e): ("together", "alone") for e in range(g.num_experts)}
        procs, addresses = start_workers(path, placement, Path(tmp), args.threads,
                                         extra={"alone": ["--batch-tokens", "0"],
                                                "together": ["--compute-threads", str(args.compute_threads)]})
        results: dict[tuple[str, int], dict] = {}
        try:
            channels = {w: grpc.insecure_channel(a, options=streaming.GRPC_OPTIONS) for w, a in addresses.items()}
            stubs = {w: worker_pb2_grpc.ExpertWorkerStub(c) for w, c in channels.items()}
            for stub in stubs.values():
                closed_loop(stub, layer, 2, 0.5, pool, check)  # warm both
            for _ in range(args.rounds):
                for clients in args.clients:
                    for worker in ("together", "alone"):
                        before = stats(stubs[worker])
                        run = closed_loop(stubs[worker], layer, clients, args.seconds, pool, check)
                        after = stats(stubs[worker])
                        row = results.setdefault((worker, clients), {"latencies": [], "errors": 0, "max_err": 0.0,
                                                                     "seconds": 0.0, "calls": 0, "requests": 0,
                                                                     "compute": 0.0})
                        row["latencies"] += run["latencies"]
                        row["errors"] += len(run["errors"])
                        row["max_err"] = max(row["max_err"], run["max_err"])
                        row["seconds"] += args.seconds
                        row["calls"] += after.forward_batches - before.forward_batches
                        row["requests"] += after.batched_requests - before.batched_requests
                        row["compute"] += sum(e.seconds for e in after.experts) - sum(e.seconds for e in before.experts)
            for channel in channels.values():
                channel.close()
        finally:
            stop_workers(procs)

    print(f"one worker process, one MoE layer: H={g.hidden}, I={g.intermediate}, E={g.num_experts}, top-{g.top_k}; "
          f"{args.tokens} tokens a request; {args.threads or 'torch-default'} torch threads a worker; "
          f"{args.compute_threads} compute threads batching; "
          f"{args.rounds} x {args.seconds:.0f} s per row, the two workers alternating")
    print(f"{'clients':>7} {'worker':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'busy':>5} "
          f"{'max err':>8} {'failed':>6} {'vs alone':>8}")
    print("  (busy: seconds of kernel calls per second; above 1, calls overlapped)")
    for clients in args.clients:
        rates = {}
        for worker in ("alone", "together"):
            row = results[(worker, clients)]
            lat = sorted(row["latencies"])
            rates[worker] = len(lat) / row["seconds"]
            p50, p99 = statistics.median(lat) * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3
            batch = f"{row['requests'] / row['calls']:.1f}" if row["calls"] else "-"
            ratio = f"{rates[worker] / rates['alone']:.2f}x"
            busy = row["compute"] / row["seconds"]
            print(f"{clients:>7} {worker:>9} {rates[worker]:>8.0f} {p50:>8.1f} {p99:>8.1f} {batch:>10} {busy:>5.2f} "
                  f"{row['max_err']:>8.1e} {row['errors']:>6} {ratio:>8}")


if __name__ == "__main__":
    main()
