"""Part 4 of bench/elastic.py: expert migration bandwidth.

PullExpert (the bulk side channel) between two worker processes on loopback vs a plain TCP
copy of as many distinct bytes (one expert's worth per transfer) between two processes, and
the ExportExpert gRPC stream alone for contrast. After a warm-up pull, the target worker's
layer buffers exist, as they do on a worker that rebalances.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from moecluster.bench.report import Results, log, median
from moecluster.models.checkpoint import Checkpoint
from moecluster.models.tiny import create_checkpoint
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import endpoints, internal_tls, streaming

FAMILY = "qwen3_moe"
MB = 1e6

# A plain TCP sender: listens on 127.0.0.1, prints its port; per connection reads an 8-byte
# length N and sends N bytes. Bounded: it exits after LIFETIME seconds or when stdin closes.
TCP_SENDER = r"""
import os, socket, struct, sys, threading, time
LIFETIME, SIZE = float(sys.argv[1]), int(sys.argv[2])
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4); srv.settimeout(1.0)
# one expert's worth of distinct bytes, like the weights a pull sends (not a cache-hot block sent over and over)
block = memoryview(os.urandom(SIZE))
print(srv.getsockname()[1], flush=True)
deadline = time.monotonic() + LIFETIME
while time.monotonic() < deadline:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        continue
    with conn:
        conn.settimeout(60)
        head = b""
        while len(head) < 8:
            part = conn.recv(8 - len(head))
            if not part:
                break
            head += part
        if len(head) < 8:
            continue
        left = struct.unpack("!Q", head)[0]
        while left:
            n = min(left, len(block))
            conn.sendall(block[:n])
            left -= n  # a request for more than SIZE sends the block again
"""


def start_worker(path: Path, index: Path, experts: str, worker_id: str, run_dir: Path, procs: list,
                 tls: Path | None = None) -> str:
    """A worker process; with `tls`, a folder of cluster certificates, it speaks mutual TLS (internal_tls.py)."""
    ready = run_dir / f"{worker_id}.ready"
    logfile = open(run_dir / f"{worker_id}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecluster.workers.server", "--checkpoint", str(path), "--index", str(index),
         "--experts", experts, "--worker-id", worker_id, "--threads", "1", "--grace", "1",
         "--ready-file", str(ready)],
        stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **({internal_tls.ENV: str(tls)} if tls else {})})
    logfile.close()
    procs.append(proc)
    deadline = time.monotonic() + 120
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{worker_id} did not start; see {run_dir / (worker_id + '.log')}")
        time.sleep(0.05)
    return json.loads(ready.read_text())["address"]


def tcp_copy(port: int, nbytes: int) -> float:
    """Receives `nbytes` from the sender process; returns seconds from connect to the last byte."""
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(nbytes.to_bytes(8, "big"))
        got = 0
        while got < nbytes:
            n = sock.recv_into(view[got:], min(nbytes - got, 4 << 20))
            if n == 0:
                raise RuntimeError(f"sender closed after {got} of {nbytes} bytes")
            got += n
    return time.perf_counter() - start


def migration_bandwidth(tmp: Path, results: Results, reps: int, procs: list) -> None:
    log("4. expert migration: PullExpert between two worker processes vs a plain TCP copy")
    path = create_checkpoint(FAMILY, tmp / "big", layers=1, hidden=1024, intermediate=2048, experts=4, top_k=2,
                             vocab=64)
    checkpoint = Checkpoint(path)
    index = tmp / "big-index.json"
    checkpoint.save_index(index)
    layer = checkpoint.geometry.moe_layers[0]
    n = checkpoint.geometry.num_experts
    run_dir = tmp / "run-migration"
    run_dir.mkdir()
    a = start_worker(path, index, f"{layer}:0-{n - 1}", "bench-a", run_dir, procs)
    b = start_worker(path, index, "", "bench-b", run_dir, procs)
    certs = internal_tls.generate(tmp / "certs", "bench")  # the same pair again, all calls and copies over mutual TLS
    tls_a = start_worker(path, index, f"{layer}:0-{n - 1}", "bench-tls-a", run_dir, procs, tls=certs)
    tls_b = start_worker(path, index, "", "bench-tls-b", run_dir, procs, tls=certs)
    sender = subprocess.Popen([sys.executable, "-c", TCP_SENDER, "240", str(checkpoint.expert_bytes)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    procs.append(sender)
    port = int(sender.stdout.readline())
    keys = [worker_pb2.ExpertKey(layer=layer, expert=e) for e in range(n)]
    channel = grpc.insecure_channel(b, options=streaming.GRPC_OPTIONS)
    stub = worker_pb2_grpc.ExpertWorkerStub(channel)
    source_channel = grpc.insecure_channel(a, options=streaming.GRPC_OPTIONS)
    source = worker_pb2_grpc.ExpertWorkerStub(source_channel)
    tls_channel = endpoints.internal_channel(tls_b, options=streaming.GRPC_OPTIONS, tls_folder=certs)
    tls_stub = worker_pb2_grpc.ExpertWorkerStub(tls_channel)
    pull_rates, tls_rates, tcp_rates, export_rates, total = [], [], [], [], 0

    def pull_all(target: worker_pb2_grpc.ExpertWorkerStub, source_address: str) -> tuple[int, float]:
        """(bytes, MB/s) of pulling every expert to `target`, then dropping them again."""
        moved, start = 0, time.perf_counter()
        for key in keys:
            response = target.PullExpert(worker_pb2.PullExpertRequest(expert=key, source=source_address, epoch=1),
                                         timeout=60)
            if response.bytes == 0:
                raise RuntimeError(f"the target already held {key}: DropExperts did not drop it")
            moved += response.bytes
        rate = moved / (time.perf_counter() - start) / MB
        held = target.Stats(worker_pb2.StatsRequest(), timeout=10).held
        if len(held) != n:
            raise RuntimeError(f"the target holds {len(held)} experts after pulling {n}")
        target.DropExperts(worker_pb2.DropExpertsRequest(experts=keys, epoch=1), timeout=30)
        return moved, rate

    try:
        # Warm-up: one pull and one TCP copy not counted (first-touch page faults, channel set-up).
        for target, source_address in ((stub, a), (tls_stub, tls_a)):
            target.PullExpert(worker_pb2.PullExpertRequest(expert=keys[0], source=source_address, epoch=1), timeout=60)
            target.DropExperts(worker_pb2.DropExpertsRequest(experts=keys, epoch=1), timeout=30)
        tcp_copy(port, checkpoint.expert_bytes)
        for rep in range(reps):  # interleaved, so drift hits both sides alike
            moved, rate = pull_all(stub, a)
            pull_rates.append(rate)
            tls_rates.append(pull_all(tls_stub, tls_a)[1])
            seconds = sum(tcp_copy(port, moved // n) for _ in range(n))  # same bytes, same number of transfers
            tcp_rates.append(moved / seconds / MB)
            start = time.perf_counter()  # where the time goes: A's ExportExpert stream alone, into this process
            for key in keys:
                streaming.join(source.ExportExpert(worker_pb2.ExportExpertRequest(expert=key), timeout=60),
                               limit_bytes=1 << 30)
            export_rates.append(moved / (time.perf_counter() - start) / MB)
            total = moved
    finally:
        channel.close()
        source_channel.close()
        tls_channel.close()
    per_expert = total / n / 2**20
    pull, tcp = median(pull_rates), median(tcp_rates)
    results.add("migration: PullExpert", f"{pull:.0f} MB/s ({n} experts x {per_expert:.1f} MiB, median of {reps})")
    results.add("migration: ExportExpert stream alone", f"{median(export_rates):.0f} MB/s (A -> this process, joined)")
    results.add("migration: PullExpert over mutual TLS", f"{median(tls_rates):.0f} MB/s ({median(tls_rates) / pull:.0%} "
                "of plaintext; workers with --internal-tls certificates)")
    results.add("migration: plain TCP copy", f"{tcp:.0f} MB/s (same bytes, process to process)")
    results.add("migration: PullExpert / TCP", f"{pull / tcp:.0%}", ">= 50%", pull / tcp >= 0.5)
