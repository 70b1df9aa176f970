"""Observability: Prometheus text on /metrics from workers, frontend and controller; OpenTelemetry spans."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
import torch
from moecluster import Client
from moecluster.controller import plan as p
from moecluster.controller.executor import Executor
from moecluster.controller.metrics import ControllerMetrics
from moecluster.controller.publisher import Publisher
from moecluster.frontend.dispatcher import Dispatcher
from moecluster.frontend.routing import RoutingTable
from moecluster.models.checkpoint import Checkpoint
from moecluster.observability import prometheus
from moecluster.observability.prometheus import Registry, parse, serve_metrics
from moecluster.observability.tracing import TRACE_FILE_ENV, configure_tracing
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.sdk.client import MoEClusterError
from moecluster.wire import streaming
from moecluster.wire.tensors import encode
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from shared import running_workers

TIMEOUT_S = 30.0


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parses the exposition strictly: every non-comment line is `name{labels} value`, each series once."""
    out = {}
    for name, labels, value in parse(text):
        key = (name, frozenset(labels.items()))
        assert key not in out, f"series {key} twice"
        out[key] = value
    return out


def value(parsed, name: str, **labels) -> float:
    return parsed[(name, frozenset((k, str(v)) for k, v in labels.items()))]


def forward_request(layer: int, tokens: int, experts: list[int], seed: int = 0) -> worker_pb2.ForwardRequest:
    gen = torch.Generator().manual_seed(seed)
    index = torch.tensor(experts)[torch.stack([torch.randperm(len(experts), generator=gen)[:2] for _ in range(tokens)])]
    return worker_pb2.ForwardRequest(layer=layer, hidden_states=encode(torch.randn(tokens, 64, generator=gen)),
                                     top_k_index=encode(index.to(torch.int32)),
                                     top_k_weights=encode(torch.rand(tokens, 2, generator=gen)))


@pytest.fixture(scope="module")
def spans():
    """Tracing on in this process, spans kept in memory; cleared for each test that asks."""
    exporter = InMemorySpanExporter()
    configure_tracing("moecluster-tests", exporter=exporter)
    yield exporter
    exporter.shutdown()  # later tests in the session record nothing more here


def finished(exporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


# -- the registry and the text format ----------------------------------------------------------


def test_registry_renders_the_text_format_and_reads_back():
    r = Registry()
    tokens = r.counter("demo_tokens_total", "tokens\nper expert", ["layer", "expert"])
    tokens.inc(3, layer=0, expert=1)
    tokens.inc(layer=0, expert=1)
    r.gauge("demo_load", "load", ["worker"]).set(0.25, worker='w"1\\x\n')
    r.gauge("demo_epoch").set(7)
    r.gauge("demo_inf").set(math.inf)
    r.counter("demo_idle_total")  # unlabelled: there at 0 before it moves
    text = r.render()
    assert "# HELP demo_tokens_total tokens\\nper expert\n# TYPE demo_tokens_total counter\n" in text
    parsed = samples(text)
    assert value(parsed, "demo_tokens_total", layer=0, expert=1) == 4
    assert value(parsed, "demo_load", worker='w"1\\x\n') == 0.25
    assert value(parsed, "demo_epoch") == 7 and value(parsed, "demo_idle_total") == 0
    assert value(parsed, "demo_inf") == math.inf
    assert r.counter("demo_tokens_total", labels=["layer", "expert"]) is tokens  # same family, same object
    with pytest.raises(ValueError, match="cannot go down"):
        tokens.inc(-1, layer=0, expert=1)
    with pytest.raises(ValueError, match="takes labels"):
        tokens.inc(layer=0)
    with pytest.raises(ValueError):
        r.gauge("demo_tokens_total")
    with pytest.raises(ValueError):
        Registry().counter("bad-name")
    for bad in ("demo 1 2 3", 'demo{a="1} 2', "demo{a=1} 2", "demo one"):
        with pytest.raises(ValueError):
            parse(bad)


def test_controller_metrics_are_the_text_format():
    m = ControllerMetrics()
    m.epoch(4)
    m.bytes_moved("peer", 1024)
    m.bytes_moved("checkpoint", 10)
    m.step_seconds("PullExpert", 0.5)
    m.migration_seconds(0.25)
    m.scale_seconds(3.0)
    m.gauge("imbalance", 1.5)
    m.gauge("workers_serving", 3)
    parsed = samples(m.render())
    assert value(parsed, "moecluster_epoch") == 4
    assert value(parsed, "moecluster_bytes_moved_total", source="peer") == 1024
    assert value(parsed, "moecluster_step_seconds_count", step="PullExpert") == 1
    assert value(parsed, "moecluster_migration_seconds_sum") == 0.25
    assert value(parsed, "moecluster_scale_seconds_count") == 1
    assert value(parsed, "moecluster_imbalance") == 1.5 and value(parsed, "moecluster_workers_serving") == 3
    m.labelled_gauge("layer_imbalance", "layer", {"0": 1.25, "1": 2.0})
    m.labelled_gauge("layer_imbalance", "layer", {"0": 1.0})  # all at once: layer 1 carries no load now
    parsed = samples(m.render())
    assert value(parsed, "moecluster_layer_imbalance", layer="0") == 1.0
    assert ("moecluster_layer_imbalance", frozenset({("layer", "1")})) not in parsed


def test_metrics_server_serves_only_metrics_and_survives_a_failing_render():
    calls = []

    def render():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return "x_total 1\n"

    server = serve_metrics(render, 0)
    try:
        assert server.address.startswith("127.0.0.1:") and not server.address.endswith(":0")
        assert scrape(server.address) == "x_total 1\n"
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(server.address)
        assert err.value.code == 500
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{server.address}/", timeout=5)
        assert err.value.code == 404
        assert scrape(server.address) == "x_total 1\n"
    finally:
        server.stop()


# -- workers: metrics, expert.pull spans --------------------------------------------------------


def test_worker_metrics_move_with_forwards_and_pulls(qwen3, spans):
    placement = {**{(0, e): ("a",) for e in range(8)}, (1, 0): ("b",)}
    with running_workers(qwen3, placement) as servers:
        a, b = servers["a"], servers["b"]
        metrics = {w: serve_metrics(s.render_metrics, 0) for w, s in servers.items()}
        try:
            before = samples(scrape(metrics["a"].address))
            assert value(before, "moecluster_worker_requests_total") == 0
            assert value(before, "moecluster_worker_experts_held") == 8
            assert value(before, "moecluster_worker_info", worker="a") == 1
            requests = [forward_request(0, 16, [1, 2, 3], seed=s) for s in range(3)]
            with grpc.insecure_channel(a.address, options=streaming.GRPC_OPTIONS) as channel:
                stub = worker_pb2_grpc.ExpertWorkerStub(channel)
                for request in requests:
                    stub.Forward(request, timeout=TIMEOUT_S)
                with pytest.raises(grpc.RpcError):
                    stub.Forward(forward_request(1, 4, [0, 1]), timeout=TIMEOUT_S)  # layer 1 is not on "a"
            after = samples(scrape(metrics["a"].address))
            assert value(after, "moecluster_worker_requests_total") == 3
            assert value(after, "moecluster_worker_rejected_total") == 1
            # one at a time: a call each, the refused one too (it is refused inside its call)
            assert value(after, "moecluster_worker_forward_batches_total") == 4
            assert value(after, "moecluster_worker_batched_requests_total") == 4
            from moecluster.wire.tensors import decode
            sent = torch.cat([decode(r.top_k_index) for r in requests]).flatten()
            for expert in (1, 2, 3):
                assert value(after, "moecluster_worker_tokens_total", layer=0, expert=expert) == int((sent == expert).sum())
                assert value(after, "moecluster_worker_expert_seconds_total", layer=0, expert=expert) > 0
            assert ("moecluster_worker_tokens_total", frozenset({("layer", "0"), ("expert", "4")})) not in after
            # each RPC timed, by its outcome: the three answered, the one refused
            ok = {"method": "Forward", "code": "OK"}
            assert value(after, "moecluster_worker_rpc_seconds_count", **ok) == 3
            assert value(after, "moecluster_worker_rpc_seconds_bucket", **ok, le="+Inf") == 3
            assert value(after, "moecluster_worker_rpc_seconds_sum", **ok) > 0
            assert value(after, "moecluster_worker_rpc_seconds_count", method="Forward", code="FAILED_PRECONDITION") == 1

            spans.clear()
            with grpc.insecure_channel(b.address, options=streaming.GRPC_OPTIONS) as channel:
                pulled = worker_pb2_grpc.ExpertWorkerStub(channel).PullExpert(
                    worker_pb2.PullExpertRequest(expert=worker_pb2.ExpertKey(layer=0, expert=5), source=a.address,
                                                 epoch=3), timeout=TIMEOUT_S)
            assert pulled.bytes > 0
            on_b = samples(scrape(metrics["b"].address))
            assert value(on_b, "moecluster_worker_bytes_pulled_total") == pulled.bytes
            assert value(on_b, "moecluster_worker_experts_held") == 2
            assert value(on_b, "moecluster_worker_epoch") == 3
            assert value(on_b, "moecluster_worker_rpc_seconds_count", method="PullExpert", code="OK") == 1
            [span] = finished(spans, "expert.pull")
            assert dict(span.attributes) == {"layer": 0, "expert": 5, "source": a.address, "bytes": pulled.bytes}
            assert span.status.is_ok
        finally:
            for server in metrics.values():
                server.stop()


def test_dispatch_span_names_layer_tokens_workers_and_retries(qwen3, spans):
    g = Checkpoint(qwen3).geometry
    placement = {(1, e): ("w0", "w1") if e < 4 else ("w1",) for e in range(g.num_experts)}
    with running_workers(qwen3, placement) as servers:
        table = RoutingTable(1, {w: s.address for w, s in servers.items()}, placement)
        dispatcher = Dispatcher(table, timeout=10)
        try:
            gen = torch.Generator().manual_seed(0)
            hidden = torch.randn(24, g.hidden, generator=gen)
            weights, ids = torch.softmax(torch.randn(24, g.num_experts, generator=gen), -1).topk(g.top_k, dim=-1)
            spans.clear()
            dispatcher.forward(1, hidden, ids, weights)
            [span] = finished(spans, "moe.dispatch")
            assert span.attributes["layer"] == 1 and span.attributes["tokens"] == 24
            assert 1 <= span.attributes["workers"] <= 2 and span.attributes["retries"] == 0

            servers["w0"].stop(0)  # w0's share fails over to w1
            ids = torch.tensor([[0, 1]] * 6)
            spans.clear()
            dispatcher.forward(1, hidden[:6], ids, weights[:6])
            [span] = finished(spans, "moe.dispatch")
            assert span.attributes["tokens"] == 6 and span.attributes["retries"] >= 1
            assert span.attributes["workers"] == 2
            assert dispatcher.outstanding() == {"w0": 0, "w1": 0}
            text = prometheus.frontend_metrics(requests=2, failed=0, retries=dispatcher.retries,
                                               wire_bytes=dispatcher.wire_bytes, epoch=table.epoch,
                                               outstanding=dispatcher.outstanding())
            parsed = samples(text)
            assert value(parsed, "moecluster_frontend_dispatch_retries_total") == dispatcher.retries >= 1
            assert value(parsed, "moecluster_frontend_wire_bytes_total") > 0
            assert value(parsed, "moecluster_frontend_outstanding_tokens", worker="w1") == 0
            assert value(parsed, "moecluster_frontend_epoch") == 1
        finally:
            dispatcher.close()


def test_frontend_metrics_count_requests_failures_and_epoch(qwen3):
    from moecluster.frontend.server import FrontendServer
    from moecluster.protos import frontend_pb2

    class Aborted(Exception):
        pass

    def abort(code, message):
        raise Aborted(code)

    g = Checkpoint(qwen3).geometry
    placement = {(layer, e): ("w",) for layer in g.moe_layers for e in range(g.num_experts)}
    with running_workers(qwen3, placement) as servers:
        frontend = FrontendServer(qwen3, "127.0.0.1:9")  # never started: no controller needed
        metrics = serve_metrics(frontend.render_metrics, 0)
        try:
            frontend.dispatcher.update(RoutingTable(2, {"w": servers["w"].address}, placement))
            request = frontend_pb2.ForwardRequest(input_ids=encode(torch.tensor([[1, 2, 3, 4]])))
            frontend.service.Forward(request, SimpleNamespace(abort=abort))
            frontend.dispatcher.update(RoutingTable(3, {"w": servers["w"].address}, {}))  # no expert anywhere
            with pytest.raises(Aborted):
                frontend.service.Forward(request, SimpleNamespace(abort=abort))
            parsed = samples(scrape(metrics.address))
            assert value(parsed, "moecluster_frontend_requests_total") == 2
            assert value(parsed, "moecluster_frontend_failed_total") == 1
            assert value(parsed, "moecluster_frontend_epoch") == 3
            assert value(parsed, "moecluster_frontend_workers") == 1
            assert value(parsed, "moecluster_frontend_outstanding_tokens", worker="w") == 0
            assert value(parsed, "moecluster_frontend_wire_bytes_total") > 0
            assert value(parsed, "moecluster_frontend_forward_batches_total") == 2  # each alone, the failed one too
            assert value(parsed, "moecluster_frontend_batched_forwards_total") == 2

            # through the gRPC server: every RPC timed by its outcome, and the tokens generated counted
            frontend.dispatcher.update(RoutingTable(4, {"w": servers["w"].address}, placement))
            frontend.server.start()
            with Client(frontend.address, timeout=TIMEOUT_S) as client:
                client.generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=3)
                client.generate(torch.tensor([[5]]), max_new_tokens=2, do_sample=True, seed=1)
                with pytest.raises(MoEClusterError):
                    client.forward(torch.tensor([[10**6]]))  # not a token
            parsed = samples(scrape(metrics.address))
            assert value(parsed, "moecluster_frontend_generated_tokens_total") == 2 * 3 + 2
            assert value(parsed, "moecluster_frontend_rpc_seconds_count", method="Generate", code="OK") == 2
            assert value(parsed, "moecluster_frontend_rpc_seconds_count", method="Forward", code="INVALID_ARGUMENT") == 1
            assert value(parsed, "moecluster_frontend_rpc_seconds_sum", method="Generate", code="OK") > 0
        finally:
            metrics.stop()
            frontend.stop(0)


def test_controller_steps_are_spans(spans):
    publisher = Publisher(epoch=5)
    monitor = SimpleNamespace(snapshot=lambda: SimpleNamespace(workers={}))
    metrics = ControllerMetrics()
    spans.clear()
    Executor(SimpleNamespace(), monitor, publisher, metrics, progress=lambda _: None).run([p.AwaitAcks()])
    [span] = finished(spans, "controller.step")
    assert span.attributes["step"] == "AwaitAcks" and span.attributes["key"] == p.AwaitAcks().key
    assert value(samples(metrics.render()), "moecluster_step_seconds_count", step="AwaitAcks") == 1


# -- a worker process: --metrics-port, the ready file, MOECLUSTER_TRACE_FILE ------------------------


def test_worker_process_exports_metrics_and_traces_to_a_file(qwen3, tmp_path):
    index = tmp_path / "index.json"
    Checkpoint(qwen3).save_index(index)
    ready, trace_file, log = tmp_path / "ready.json", tmp_path / "spans.jsonl", open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecluster.workers.server", "--checkpoint", str(qwen3), "--index", str(index),
         "--experts", "", "--ready-file", str(ready), "--threads", "1", "--worker-id", "traced"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, TRACE_FILE_ENV: str(trace_file)})
    try:
        with running_workers(qwen3, {(1, 6): ("source",)}) as servers:
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "worker never became ready"
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            assert value(samples(scrape(info["metrics"])), "moecluster_worker_experts_held") == 0
            with grpc.insecure_channel(info["address"], options=streaming.GRPC_OPTIONS) as channel:
                worker_pb2_grpc.ExpertWorkerStub(channel).PullExpert(
                    worker_pb2.PullExpertRequest(expert=worker_pb2.ExpertKey(layer=1, expert=6),
                                                 source=servers["source"].address), timeout=TIMEOUT_S)
            assert value(samples(scrape(info["metrics"])), "moecluster_worker_bytes_pulled_total") > 0
        lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
        [pull] = [s for s in lines if s["name"] == "expert.pull"]
        assert pull["attributes"]["layer"] == 1 and pull["attributes"]["expert"] == 6
        assert pull["attributes"]["bytes"] > 0 and pull["resource"]["attributes"]["service.name"] == "moecluster-worker"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
