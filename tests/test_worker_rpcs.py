"""The expert worker's RPCs on real gRPC: Forward(Stream), load/drop, stats, health, process life
(copies between workers: test_worker_pull.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import streaming
from moecluster.wire.tensors import decode
from moecluster.workers.service import SERVICE_NAME
from shared import running_workers
from worker_helpers import (
    TIMEOUT_S,
    expected,
    forward,
    held,
    keys,
    max_err,
    pairs,
    request,
    routing,
    stats,
    stub_for,
)

ALL = {(layer, e): ("w",) for layer in (0, 1) for e in range(8)}


# -- Forward ---------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("tokens", [0, 1, 2, 17, 300, 2500])
@pytest.mark.parametrize("layer", [0, 1])
def test_forward_matches_reference(full_worker, weights, layer, tokens, index_dtype):
    hidden, index, top_w = routing(tokens, list(range(8)), seed=tokens + layer, index_dtype=index_dtype)
    if tokens > 1:
        index[::3, 1] = -1  # assignments another worker serves
    out = forward(full_worker, layer, hidden, index, top_w)
    assert out.dtype == torch.float32 and out.shape == (tokens, 64)
    assert max_err(out, expected(weights, layer, hidden, index, top_w)) <= 1e-5


def test_forward_all_minus_one_is_zero(full_worker):
    hidden, index, top_w = routing(5, list(range(8)))
    out = forward(full_worker, 0, hidden, torch.full_like(index, -1), top_w)
    assert torch.equal(out, torch.zeros(5, 64))


def test_forward_top_k_eight(full_worker, weights):
    hidden, index, top_w = routing(40, list(range(8)), k=8, seed=3)
    out = forward(full_worker, 1, hidden, index, top_w)
    assert max_err(out, expected(weights, 1, hidden, index, top_w)) <= 1e-5


def test_forward_bf16_answers_in_bf16_close_to_fp32(full_worker, weights):
    hidden, index, top_w = routing(64, list(range(8)), seed=5)
    out = forward(full_worker, 0, hidden.bfloat16(), index, top_w.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (64, 64)
    reference = expected(weights, 0, hidden, index, top_w)
    scale = reference.abs().max().item()
    assert scale > 0
    assert max_err(out, reference) <= 0.05 * scale


def test_two_workers_split_a_layer_and_sum_to_the_whole(qwen3, weights):
    placement = {(0, e): ("a",) if e < 4 else ("b",) for e in range(8)}
    hidden, index, top_w = routing(50, list(range(8)), seed=11)
    with running_workers(qwen3, placement) as servers:
        outs = []
        for name, mine in (("a", range(4)), ("b", range(4, 8))):
            channel, stub = stub_for(servers[name])
            with channel:
                local = torch.where(torch.isin(index, torch.tensor(list(mine), dtype=index.dtype)), index, -1)
                outs.append(forward(stub, 0, hidden, local, top_w))
    assert max_err(outs[0] + outs[1], expected(weights, 0, hidden, index, top_w)) <= 1e-5


# -- ForwardStream ---------------------------------------------------------------


def test_forward_stream_equals_unary_and_streams_back_in_chunks(full_worker, weights):
    tokens = 12_000  # 12000 x 64 x 4 B = 3 MiB of hidden states each way
    hidden, index, top_w = routing(tokens, list(range(8)), seed=7)
    message = request(1, hidden, index, top_w)
    payload = message.SerializeToString()
    assert streaming.needs_streaming(len(payload))
    sent = list(streaming.split(payload))
    assert len(sent) >= 3

    chunks = list(full_worker.ForwardStream(iter(sent), timeout=TIMEOUT_S))
    assert len(chunks) >= 3 and chunks[-1].last and not any(c.last for c in chunks[:-1])
    assert all(len(c.data) <= streaming.CHUNK_BYTES for c in chunks)
    streamed = worker_pb2.ForwardResponse.FromString(streaming.join(iter(chunks), limit_bytes=1 << 26))
    out_stream = decode(streamed.output)

    unary = full_worker.Forward(message, timeout=TIMEOUT_S)
    out_unary = decode(unary.output)
    assert out_stream.shape == (tokens, 64)
    assert max_err(out_stream, out_unary) <= 1e-6
    assert max_err(out_stream, expected(weights, 1, hidden, index, top_w)) <= 1e-5


def test_forward_stream_small_payload_is_one_chunk(full_worker, weights):
    hidden, index, top_w = routing(3, list(range(8)), seed=8)
    chunks = list(full_worker.ForwardStream(streaming.split(request(0, hidden, index, top_w).SerializeToString()),
                                            timeout=TIMEOUT_S))
    assert len(chunks) == 1 and chunks[0].last
    out = decode(worker_pb2.ForwardResponse.FromString(streaming.join(iter(chunks), limit_bytes=1 << 20)).output)
    assert max_err(out, expected(weights, 0, hidden, index, top_w)) <= 1e-5


# -- LoadExperts / DropExperts ---------------------------------------------------


def test_load_and_drop_are_idempotent_and_forward_follows(qwen3, ckpt, weights):
    placement = {(0, e): ("w",) for e in range(4)}
    with running_workers(qwen3, placement) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            assert held(stub) == [(0, 0), (0, 1), (0, 2), (0, 3)]
            loaded = stub.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((0, 2), (0, 4), (0, 5), (0, 4))),
                                      timeout=TIMEOUT_S)
            assert pairs(loaded.loaded) == [(0, 4), (0, 5)]
            assert loaded.bytes_read == 2 * ckpt.expert_bytes
            again = stub.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((0, 4), (0, 5))), timeout=TIMEOUT_S)
            assert pairs(again.loaded) == [] and again.bytes_read == 0
            assert held(stub) == [(0, e) for e in range(6)]

            hidden, index, top_w = routing(30, [1, 4, 5], seed=1)
            assert max_err(forward(stub, 0, hidden, index, top_w), expected(weights, 0, hidden, index, top_w)) <= 1e-5

            dropped = stub.DropExperts(worker_pb2.DropExpertsRequest(experts=keys((0, 4), (1, 3))), timeout=TIMEOUT_S)
            assert pairs(dropped.dropped) == [(0, 4)]
            again = stub.DropExperts(worker_pb2.DropExpertsRequest(experts=keys((0, 4))), timeout=TIMEOUT_S)
            assert pairs(again.dropped) == []
            assert held(stub) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 5)]

            with pytest.raises(grpc.RpcError) as caught:
                forward(stub, 0, hidden, index, top_w)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "[4]" in caught.value.details() and "epoch" in caught.value.details()
            others = torch.where(index == 4, -1, index)  # without expert 4 the rest still answers
            assert max_err(forward(stub, 0, hidden, others, top_w), expected(weights, 0, hidden, others, top_w)) <= 1e-5

            # load it back into a layer that still holds others: the stacked snapshot grows
            loaded = stub.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((0, 4), (1, 6))), timeout=TIMEOUT_S)
            assert pairs(loaded.loaded) == [(0, 4), (1, 6)]
            assert max_err(forward(stub, 0, hidden, index, top_w), expected(weights, 0, hidden, index, top_w)) <= 1e-5
            h1, i1, w1 = routing(9, [6], k=1, seed=2)
            assert max_err(forward(stub, 1, h1, i1, w1), expected(weights, 1, h1, i1, w1)) <= 1e-5

            # a layer emptied completely, then refilled
            stub.DropExperts(worker_pb2.DropExpertsRequest(experts=keys(*[(0, e) for e in range(8)])), timeout=TIMEOUT_S)
            assert held(stub) == [(1, 6)]
            with pytest.raises(grpc.RpcError) as caught:
                forward(stub, 0, hidden, index, top_w)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "epoch" in caught.value.details()
            assert torch.equal(forward(stub, 0, hidden, torch.full_like(index, -1), top_w), torch.zeros(30, 64))
            stub.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((0, 5), (0, 1), (0, 4))), timeout=TIMEOUT_S)
            assert max_err(forward(stub, 0, hidden, index, top_w), expected(weights, 0, hidden, index, top_w)) <= 1e-5
            assert stats(stub).rejected == 2


def test_forward_is_consistent_while_experts_come_and_go(qwen3, weights):
    """Forwards on always-held experts stay right while another thread loads and drops others."""
    placement = {(0, e): ("w",) for e in range(4)}
    stop = threading.Event()
    errors: list[BaseException] = []
    with running_workers(qwen3, placement) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            def churn():
                try:
                    while not stop.is_set():
                        stub.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((0, 6), (0, 7))), timeout=TIMEOUT_S)
                        stub.DropExperts(worker_pb2.DropExpertsRequest(experts=keys((0, 6))), timeout=TIMEOUT_S)
                        stub.DropExperts(worker_pb2.DropExpertsRequest(experts=keys((0, 7), (0, 2))), timeout=TIMEOUT_S)
                        stub.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((0, 2))), timeout=TIMEOUT_S)
                except BaseException as err:  # noqa: BLE001 - reported below
                    errors.append(err)

            thread = threading.Thread(target=churn, daemon=True)
            thread.start()
            try:
                for seed in range(40):
                    hidden, index, top_w = routing(20, [0, 1, 3], seed=seed)
                    assert max_err(forward(stub, 0, hidden, index, top_w),
                                   expected(weights, 0, hidden, index, top_w)) <= 1e-5
            finally:
                stop.set()
                thread.join(timeout=TIMEOUT_S)
            assert not thread.is_alive() and not errors
            assert held(stub) == [(0, 0), (0, 1), (0, 2), (0, 3)]


# -- Stats -----------------------------------------------------------------------


def test_stats_count_tokens_calls_and_epoch(qwen3):
    placement = {(0, e): ("w",) for e in range(8)}
    with running_workers(qwen3, placement) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            first = stats(stub)
            assert first.worker_id == "w" and first.pid == os.getpid() and first.epoch == 0
            assert first.requests == 0 and list(first.experts) == [] and not first.draining

            tokens: dict[int, int] = {}
            calls: dict[int, int] = {}
            for seed, (n, pool) in enumerate([(10, [0, 1, 2]), (7, [2, 3]), (0, [4, 5]), (33, list(range(8)))]):
                hidden, index, top_w = routing(n, pool, seed=seed)
                if n:
                    index[0, 0] = -1
                forward(stub, 0, hidden, index, top_w)
                ids, counts = torch.unique(index[index >= 0], return_counts=True)
                for e, c in zip(ids.tolist(), counts.tolist()):
                    tokens[e] = tokens.get(e, 0) + c
                    calls[e] = calls.get(e, 0) + 1
            now = stats(stub)
            assert now.requests == 4
            assert {s.expert.expert: s.tokens for s in now.experts} == tokens
            assert {s.expert.expert: s.calls for s in now.experts} == calls
            assert all(s.expert.layer == 0 and s.seconds >= 0 for s in now.experts)

            epochs = []
            stub.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((1, 0)), epoch=3), timeout=TIMEOUT_S)
            epochs.append(stats(stub).epoch)
            stub.DropExperts(worker_pb2.DropExpertsRequest(experts=keys((1, 0)), epoch=2), timeout=TIMEOUT_S)
            epochs.append(stats(stub).epoch)
            stub.DropExperts(worker_pb2.DropExpertsRequest(experts=keys((0, 7)), epoch=6), timeout=TIMEOUT_S)
            epochs.append(stats(stub).epoch)
            stub.PullExpert(worker_pb2.PullExpertRequest(expert=keys((0, 1))[0], source=servers["w"].address, epoch=11),
                            timeout=TIMEOUT_S)  # already held: nothing copied, epoch still seen
            epochs.append(stats(stub).epoch)
            stub.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((0, 7)), epoch=0), timeout=TIMEOUT_S)
            epochs.append(stats(stub).epoch)
            assert epochs == [3, 3, 6, 11, 11]
            hidden, index, top_w = routing(4, [0, 1], seed=9)
            reply = stub.Forward(request(0, hidden, index, top_w, epoch=2), timeout=TIMEOUT_S)
            assert reply.epoch == 11  # a Forward from an older epoch neither lowers it
            reply = stub.Forward(request(0, hidden, index, top_w, epoch=50), timeout=TIMEOUT_S)
            assert reply.epoch == 11 and stats(stub).epoch == 11  # nor do Forwards move it


# -- Health / Drain --------------------------------------------------------------


def test_health_serving_then_drain_keeps_answering(qwen3, weights):
    with running_workers(qwen3, {(0, 0): ("w",), (0, 1): ("w",)}) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            for name in ("", SERVICE_NAME):
                assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S).status == serving
            with pytest.raises(grpc.RpcError) as caught:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND

            stub.Drain(worker_pb2.DrainRequest(), timeout=TIMEOUT_S)
            for name in ("", SERVICE_NAME):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert stats(stub).draining
            hidden, index, top_w = routing(12, [0, 1], seed=12)
            assert max_err(forward(stub, 0, hidden, index, top_w), expected(weights, 0, hidden, index, top_w)) <= 1e-5


# -- the worker process ----------------------------------------------------------


def test_worker_process_holds_only_its_experts_and_exits_on_sigterm(qwen3, tmp_path, weights):
    ready, log = tmp_path / "ready.json", open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecluster.workers.server", "--checkpoint", str(qwen3), "--experts", "0:1-2,1:7",
         "--ready-file", str(ready), "--threads", "1", "--worker-id", "proc-w"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid
        with grpc.insecure_channel(info["address"], options=streaming.GRPC_OPTIONS) as channel:
            stub = worker_pb2_grpc.ExpertWorkerStub(channel)
            now = stats(stub)
            assert pairs(now.held) == [(0, 1), (0, 2), (1, 7)]
            assert now.pid == proc.pid and now.worker_id == "proc-w"
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT_S).status == \
                health_pb2.HealthCheckResponse.SERVING
            hidden, index, top_w = routing(8, [7], k=1, seed=13)
            assert max_err(forward(stub, 1, hidden, index, top_w), expected(weights, 1, hidden, index, top_w)) <= 1e-5

        start = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 6
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_worker_server_on_a_busy_port_says_so(qwen3):
    from moecluster.workers.server import WorkerServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            WorkerServer(qwen3, [(0, 0)], port=port)


def test_worker_process_refuses_experts_the_checkpoint_lacks(qwen3, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecluster.workers.server", "--checkpoint", str(qwen3), "--experts", "0:6-9",
         "--ready-file", str(tmp_path / "ready.json"), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert b"expert 8" in out and not (tmp_path / "ready.json").exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
