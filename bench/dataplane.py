"""One MoE layer served by worker processes over gRPC vs the same layer in-process.

    python bench/dataplane.py [--tokens 2048] [--hidden 1024] [--workers 2] [--reps 10]

Prints tokens/s both ways and their ratio, and the bytes that crossed the wire
per token against the bytes of the tensors themselves (hidden states out,
expert ids and weights out, partial sums back). "Wire" is the serialized gRPC
messages plus gRPC/HTTP2 framing (5 bytes per message, 9 per 16 KiB frame);
TCP/IP headers are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from moecluster.controller.static_placement import static_placement  # noqa: E402
from moecluster.frontend.dispatcher import Dispatcher  # noqa: E402
from moecluster.frontend.routing import RoutingTable  # noqa: E402
from moecluster.models.checkpoint import Checkpoint  # noqa: E402
from moecluster.models.tiny import create_checkpoint  # noqa: E402
from moecluster.wire import streaming  # noqa: E402
from moecluster.workers.kernels import fused_experts  # noqa: E402


def start_workers(path: Path, placement, run_dir: Path, threads: int, extra: dict[str, list[str]] | None = None):
    """One worker process per id in `placement` (`extra[id]`: more of its arguments); (processes, addresses)."""
    procs, addresses = {}, {}
    for worker_id in sorted({w for h in placement.values() for w in h}):
        spec = ",".join(f"{l}:{e}" for (l, e), h in placement.items() if worker_id in h)
        ready = run_dir / f"{worker_id}.ready"
        procs[worker_id] = subprocess.Popen(
            [sys.executable, "-m", "moecluster.workers.server", "--checkpoint", str(path), "--experts", spec,
             "--worker-id", worker_id, "--threads", str(threads), "--ready-file", str(ready),
             *(extra or {}).get(worker_id, [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    for worker_id, proc in procs.items():
        ready = run_dir / f"{worker_id}.ready"
        while not ready.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{worker_id} did not start")
            time.sleep(0.1)
        addresses[worker_id] = json.loads(ready.read_text())["address"]
    return procs, addresses


def stop_workers(procs) -> None:
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        proc.wait(timeout=30)


def framing(serialized: int) -> int:
    """gRPC length prefix + HTTP/2 DATA frame headers for one message of `serialized` bytes."""
    return 5 + 9 * (-(-(serialized + 5) // 16384))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="moecluster-bench-") as tmp:
        path = create_checkpoint("qwen3_moe", Path(tmp) / "model", layers=1, hidden=args.hidden,
                                 intermediate=args.intermediate, experts=args.experts, top_k=args.top_k, vocab=64)
        index = Checkpoint(path)
        g = index.geometry
        layer = g.moe_layers[0]
        pairs = [index.read_expert(layer, e) for e in range(g.num_experts)]
        gate_up, down = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(args.tokens, g.hidden, generator=gen)
        weights, ids = torch.softmax(torch.randn(args.tokens, g.num_experts, generator=gen), -1).topk(g.top_k, dim=-1)

        threads = max(1, torch.get_num_threads() // args.workers)
        placement = static_placement(g.moe_layers, g.num_experts, [f"w{i}" for i in range(args.workers)])
        procs, addresses = start_workers(path, placement, Path(tmp), threads)
        try:
            dispatcher = Dispatcher(RoutingTable(1, addresses, placement), timeout=60)
            expected = fused_experts(hidden, gate_up, down, ids, weights)
            remote = dispatcher.forward(layer, hidden, ids, weights)
            error = (remote - expected).abs().max().item()
            remote_times, local_times = [], []
            dispatcher.wire_bytes = 0
            for _ in range(args.reps):  # interleaved, so drift hits both sides alike
                start = time.perf_counter()
                dispatcher.forward(layer, hidden, ids, weights)
                remote_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                with torch.no_grad():
                    fused_experts(hidden, gate_up, down, ids, weights)
                local_times.append(time.perf_counter() - start)
            serialized_per_call = dispatcher.wire_bytes / args.reps
            dispatcher.close()
        finally:
            stop_workers(procs)

    # What each worker needed: the tokens that use one of its experts, their ids and weights, and its partial sums.
    owner = torch.tensor([int(placement[(layer, e)][0][1:]) for e in range(g.num_experts)])
    tensor_bytes, messages = 0, 0
    for w in range(args.workers):
        rows = int((owner[ids] == w).any(dim=1).sum())
        if rows:
            tensor_bytes += rows * (2 * g.hidden * 4 + 2 * g.top_k * 4)
            messages += 2
    chunk = streaming.CHUNK_BYTES
    wire = serialized_per_call + sum(framing(min(chunk, int(serialized_per_call / messages))) for _ in range(messages))
    wire += 9 * max(0, int(serialized_per_call // chunk))  # stream chunks are messages of their own
    remote_s, local_s = statistics.median(remote_times), statistics.median(local_times)
    print(f"one MoE layer: {args.tokens} tokens, H={g.hidden}, I={g.intermediate}, E={g.num_experts}, top-{g.top_k}; "
          f"{args.workers} worker processes x {threads} threads vs in-process ({torch.get_num_threads()} threads)")
    print(f"  max |remote - local| = {error:.2e}")
    print(f"  in-process : {args.tokens / local_s:10.0f} tokens/s  ({local_s * 1e3:.1f} ms)")
    print(f"  over gRPC  : {args.tokens / remote_s:10.0f} tokens/s  ({remote_s * 1e3:.1f} ms)")
    print(f"  ratio gRPC / in-process throughput: {local_s / remote_s:.2f}x")
    print(f"  wire bytes per token: {wire / args.tokens:.0f}; tensor bytes per token: {tensor_bytes / args.tokens:.0f}; "
          f"ratio {wire / tensor_bytes:.4f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
