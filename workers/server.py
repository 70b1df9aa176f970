"""The expert worker process.

    python -m moecluster.workers.server --checkpoint DIR --experts 0:0-7,1:0-7 [--port 0]

Loads only the named experts' tensors, serves them over gRPC on 127.0.0.1 (by
default), writes {"address", "pid"} to --ready-file once it serves, and stops
gracefully on SIGTERM (in-flight requests finish within --grace seconds).
Prometheus metrics are on http://HOST:PORT/metrics (--metrics-port; the ready
file's "metrics" names the address).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2_grpc
from moecluster.models.checkpoint import Checkpoint
from moecluster.models.devices import resolve_device
from moecluster.observability.prometheus import serve_metrics, worker_metrics
from moecluster.observability.rpc_latency import RpcLatency
from moecluster.observability.tracing import configure_tracing
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import endpoints, streaming
from moecluster.wire.bulk import BulkSender
from moecluster.wire.ready import announce_ready, stop_signal
from moecluster.wire.tensors import DTYPES
from moecluster.workers.service import DEFAULT_BATCH_TOKENS, ExpertWorkerService, expert_keys


class WorkerServer:
    """A worker service bound to a port; `start()`, then `stop(grace)`. `max_workers`: threads serving RPCs;
    a request waiting for a batch holds one, so batches grow up to that many requests."""

    def __init__(self, checkpoint: str | Path | Checkpoint, experts: list[tuple[int, int]], *, host: str = "127.0.0.1",
                 port: int = 0, worker_id: str = "worker", dtype: torch.dtype = torch.float32, max_workers: int = 64,
                 bulk_port: int = 0, device: str | torch.device = "cpu", batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 compute_threads: int = 2):
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = Checkpoint(checkpoint)
        self.bulk = BulkSender(host, bulk_port)  # started with the server: expert copies to peers
        self.service = ExpertWorkerService(checkpoint, worker_id=worker_id, dtype=dtype, device=resolve_device(device),
                                           bulk=self.bulk, batch_tokens=batch_tokens,
                                           compute_threads=compute_threads)
        self.service.load_from_checkpoint(experts)
        self.rpc_latency = RpcLatency("moecluster_worker_rpc_seconds")
        self.server = endpoints.server(max_workers, options=streaming.GRPC_OPTIONS, interceptors=[self.rpc_latency])
        worker_pb2_grpc.add_ExpertWorkerServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.service.health, self.server)
        try:
            self.port = endpoints.listen(self.server, f"{host}:{port}")
        except RuntimeError as err:  # grpcio raises where older versions returned 0
            raise OSError(f"cannot listen on {host}:{port}: {err}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.address = f"{host}:{self.port}"

    def start(self) -> "WorkerServer":
        self.service.warm_up()
        self.bulk.start()
        self.server.start()
        self.service.set_serving(True)
        return self

    def stop(self, grace: float = 5.0) -> None:
        self.service.set_serving(False)
        self.server.stop(grace).wait()
        self.bulk.close()
        self.service.close()

    def render_metrics(self) -> str:
        """Prometheus text for /metrics, from the service's Stats."""
        stats = self.service.Stats(worker_pb2.StatsRequest(), None)
        return worker_metrics(stats, bytes_pulled=self.service.bytes_pulled, latency=self.rpc_latency.histogram)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--index", type=Path, help="the checkpoint's expert index (Checkpoint.save_index): skips "
                        "importing transformers, so the worker starts in a fraction of the time")
    parser.add_argument("--experts", default="", help="experts to load, e.g. '0:0-7,1:0-3' (LAYER:FIRST-LAST, comma separated)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    parser.add_argument("--worker-id", default=f"worker-{os.getpid()}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu",
                        help="where the experts live and compute: cpu (default), cuda, cuda:N, or auto (a GPU if "
                             "torch sees one). On CUDA the Triton kernels run; requests still travel as CPU bytes")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help="inference requests for a layer that arrive while one is computed go together as the next "
                             f"kernel call, up to this many tokens (default {DEFAULT_BATCH_TOKENS}); a larger request is "
                             "computed alone at once; 0: every request alone")
    parser.add_argument("--compute-threads", type=int, default=2,
                        help="threads that compute those calls (default 2: one computes while the other prepares)")
    parser.add_argument("--ready-file", type=Path, help="write {address, pid} here once serving")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds in-flight requests get on SIGTERM")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: any free; -1: off)")
    parser.add_argument("--bulk-port", type=int, default=0,
                        help="port of the side channel peers copy experts from (default 0: any free; fix it where a "
                             "firewall or NetworkPolicy must allow it)")
    args = parser.parse_args(argv)
    configure_tracing("moecluster-worker")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)  # before the checkpoint is read: a wrong device fails at once
        checkpoint = Checkpoint.from_index(args.index) if args.index else Checkpoint(args.checkpoint)
        worker = WorkerServer(checkpoint, expert_keys(args.experts), host=args.host, port=args.port,
                              worker_id=args.worker_id, dtype=DTYPES[args.dtype], bulk_port=args.bulk_port,
                              device=device, batch_tokens=args.batch_tokens,
                              compute_threads=args.compute_threads).start()
        metrics = serve_metrics(worker.render_metrics, args.metrics_port, args.host) if args.metrics_port >= 0 else None
    except (ValueError, OSError) as err:
        sys.exit(f"worker: {err}")
    stopped = stop_signal()
    announce_ready(args.ready_file, worker.address, id=args.worker_id, **({"metrics": metrics.address} if metrics else {}))
    print(f"worker {args.worker_id} serving {len(worker.service.store.held())} experts on {worker.address} "
          f"({worker.service.store.device})", flush=True)
    stopped.wait()
    worker.stop(args.grace)
    if metrics:
        metrics.stop()


if __name__ == "__main__":
    main()
