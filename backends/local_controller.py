"""The controller process of a local cluster.

    python -m moecluster.backends.local_controller --cluster-dir DIR

Reads DIR/spec.json and DIR/cluster.json, serves `moecluster.controller.v1`
on the cluster's controller address, Prometheus metrics on /metrics, and runs
workers and the frontend as local processes. Killed and started again, it
finds its workers through their records in DIR and carries on, at the same
address. A new one (--move-if-port-taken) whose port another process bound
first listens on another and writes that into DIR/cluster.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import grpc
from moecluster.backends import cluster_record
from moecluster.backends.local_actuator import LocalActuator
from moecluster.backends.local_supervisor import watch_supervisor
from moecluster.controller.runtime import Controller
from moecluster.controller.service import ControllerService
from moecluster.controller.spec import ClusterSpec, as_flags
from moecluster.models.checkpoint import Checkpoint
from moecluster.observability.prometheus import rendered, serve_metrics
from moecluster.observability.rpc_latency import RpcLatency
from moecluster.observability.tracing import configure_tracing
from moecluster.protos import controller_pb2_grpc
from moecluster.wire import endpoints, internal_tls
from moecluster.wire.ready import announce_ready, stop_signal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster-dir", required=True, type=Path)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default: cluster.json's "
                        "metrics_port, else any free; -1: off)")
    parser.add_argument("--move-if-port-taken", action="store_true",
                        help="listen on any free port if the one in cluster.json is taken (nothing knows it yet)")
    args = parser.parse_args(argv)
    configure_tracing("moecluster-controller")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    spec_path = args.cluster_dir / "spec.json"
    spec = ClusterSpec.model_validate_json(spec_path.read_text())
    cluster = cluster_record.read(args.cluster_dir)
    # For this process's servers and channels, and every process it starts: the cluster's, not the caller's shell's.
    os.environ.pop(internal_tls.ENV, None)
    if cluster.get("internal_tls"):
        os.environ[internal_tls.ENV] = cluster["internal_tls"]
    latency = RpcLatency("moecluster_controller_rpc_seconds")  # admin calls, frontends' watches, reports
    server = endpoints.server(16, interceptors=[latency])
    address = listen(server, cluster["controller"], args.move_if_port_taken)
    if address != cluster["controller"]:
        cluster = cluster_record.update(args.cluster_dir, controller=address)
    # Workers start from the index without importing transformers; so does a restarted controller.
    geometry = Checkpoint.indexed(spec.model, args.cluster_dir / "index.json").geometry
    experts = tuple((layer, e) for layer in geometry.moe_layers for e in range(geometry.num_experts))
    actuator = LocalActuator(args.cluster_dir, spec.model, frontend_port=cluster["frontend_port"],
                             worker_threads=cluster.get("worker_threads", 1), worker_device=spec.worker_device,
                             frontend_device=spec.frontend_device, worker_flags=as_flags(spec.worker_settings()),
                             frontend_flags=as_flags({**spec.frontend_settings(), **spec.frontend_access()}))

    def save_spec(new: ClusterSpec) -> None:
        tmp = spec_path.with_suffix(".tmp")
        tmp.write_text(new.model_dump_json(indent=2))
        tmp.replace(spec_path)

    controller = Controller(spec, actuator, experts, address=cluster["controller"], save_spec=save_spec)
    stopped = stop_signal()
    controller_pb2_grpc.add_ControllerServicer_to_server(
        ControllerService(controller, on_shutdown=lambda: (controller.shutdown(), stopped.set())), server)
    controller.start()  # state rebuilt from the workers before any request is taken (a restore would find none)
    server.start()
    metrics_port = cluster.get("metrics_port", 0) if args.metrics_port is None else args.metrics_port
    render = lambda: controller.metrics.render() + rendered(latency.histogram)  # noqa: E731
    metrics = serve_metrics(render, metrics_port) if metrics_port >= 0 else None
    announce_ready(args.ready_file, cluster["controller"], **({"metrics": metrics.address} if metrics else {}))
    watch_supervisor(args.cluster_dir, stopped)  # who restarts this controller is restarted by it
    stopped.wait()
    controller.stop()  # workers and frontend keep serving unless Shutdown stopped them
    if metrics:
        metrics.stop()
    server.stop(2).wait()


def listen(server: grpc.Server, address: str, move_if_taken: bool) -> str:
    """Binds `address`, or any free port on its host when it is taken and `move_if_taken`; returns the bound one."""
    try:
        if endpoints.listen(server, address) != 0:
            return address
    except RuntimeError:  # some gRPC versions raise instead of returning 0
        pass
    host = address.rsplit(":", 1)[0]
    if move_if_taken:
        port = endpoints.listen(server, f"{host}:0")
        if port:
            logging.getLogger(__name__).warning("%s was taken; listening on %s:%d", address, host, port)
            return f"{host}:{port}"
    sys.exit(f"controller: cannot listen on {address}")


if __name__ == "__main__":
    main()
