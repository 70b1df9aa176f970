"""The expert worker's RPCs on real gRPC: Forward(Stream), load/drop, export/pull, stats, health, process life."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent import futures

import grpc
import pytest
import torch
from conftest import running_workers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moecluster.models.checkpoint import Checkpoint
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import streaming
from moecluster.wire.tensors import decode, encode
from moecluster.workers.kernels import reference_experts
from moecluster.workers.service import SERVICE_NAME

TIMEOUT_S = 30.0
ALL = {(layer, e): ("w",) for layer in (0, 1) for e in range(8)}


# -- helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(qwen3):
    return Checkpoint(qwen3)


@pytest.fixture(scope="module")
def weights(ckpt):
    """layer -> (gate_up [E, 2I, H], down [E, H, I]) read with Checkpoint.read_expert."""
    g = ckpt.geometry
    assert (g.hidden, g.intermediate, g.num_experts, g.moe_layers) == (64, 32, 8, (0, 1))  # what the tests assume
    out = {}
    for layer in g.moe_layers:
        pairs = [ckpt.read_expert(layer, e) for e in range(g.num_experts)]
        out[layer] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
    return out


@pytest.fixture(scope="module")
def full_worker(qwen3):
    """One in-process worker holding every expert of both layers; yields its stub."""
    with running_workers(qwen3, ALL) as servers:
        with grpc.insecure_channel(servers["w"].address, options=streaming.GRPC_OPTIONS) as channel:
            yield worker_pb2_grpc.ExpertWorkerStub(channel)


def stub_for(server) -> tuple[grpc.Channel, worker_pb2_grpc.ExpertWorkerStub]:
    channel = grpc.insecure_channel(server.address, options=streaming.GRPC_OPTIONS)
    return channel, worker_pb2_grpc.ExpertWorkerStub(channel)


def routing(tokens: int, experts: list[int], k: int = 2, seed: int = 0, index_dtype=torch.int32, dtype=torch.float32):
    """Random (hidden [T, H], index [T, k] of distinct ids drawn from `experts`, weights [T, k])."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=gen).to(dtype)
    choices = torch.tensor(experts)
    picks = torch.stack([torch.randperm(len(experts), generator=gen)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.long)
    index = choices[picks].to(index_dtype)
    weights = torch.rand(tokens, k, generator=gen).to(dtype)
    return hidden, index, weights


def request(layer, hidden, index, weights, epoch=0) -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(layer=layer, hidden_states=encode(hidden), top_k_index=encode(index),
                                     top_k_weights=encode(weights), epoch=epoch)


def forward(stub, layer, hidden, index, weights) -> torch.Tensor:
    response = stub.Forward(request(layer, hidden, index, weights), timeout=TIMEOUT_S)
    return decode(response.output).clone()


def expected(weights_of, layer, hidden, index, top_w) -> torch.Tensor:
    return reference_experts(hidden.float(), *weights_of[layer], index.long(), top_w.float())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def stats(stub) -> worker_pb2.StatsResponse:
    return stub.Stats(worker_pb2.StatsRequest(), timeout=TIMEOUT_S)


def held(stub) -> list[tuple[int, int]]:
    return [(k.layer, k.expert) for k in stats(stub).held]


def keys(*pairs) -> list[worker_pb2.ExpertKey]:
    return [worker_pb2.ExpertKey(layer=l, expert=e) for l, e in pairs]


def pairs(expert_keys) -> list[tuple[int, int]]:
    return [(k.layer, k.expert) for k in expert_keys]


def export(stub, layer, expert) -> tuple[worker_pb2.ExpertState, list]:
    chunks = list(stub.ExportExpert(worker_pb2.ExportExpertRequest(expert=keys((layer, expert))[0]), timeout=TIMEOUT_S))
    payload = streaming.join(iter(chunks), limit_bytes=1 << 24)  # checks size and CRC
    return worker_pb2.ExpertState.FromString(payload), chunks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# -- ExportExpert / PullExpert ---------------------------------------------------


def test_export_expert_is_checksummed_and_bit_identical(full_worker, ckpt):
    for layer, expert in [(0, 0), (0, 7), (1, 3)]:
        state, chunks = export(full_worker, layer, expert)
        payload = b"".join(c.data for c in chunks)
        assert chunks[-1].last and chunks[-1].crc32 == zlib.crc32(payload) and chunks[0].total_size == len(payload)
        assert pairs([state.expert]) == [(layer, expert)]
        gate_up, down = ckpt.read_expert(layer, expert)
        assert state.gate_up_proj.dtype == "float32" and list(state.gate_up_proj.shape) == [64, 64]
        assert list(state.down_proj.shape) == [64, 32]
        assert decode(state.gate_up_proj).numpy().tobytes() == gate_up.numpy().tobytes()
        assert decode(state.down_proj).numpy().tobytes() == down.numpy().tobytes()


def test_pull_expert_copies_bit_identical_weights(qwen3, weights):
    placement = {**{(1, e): ("a",) for e in range(8)}, **{(0, e): ("b",) for e in range(4)}}
    with running_workers(qwen3, placement) as servers:
        ca, a = stub_for(servers["a"])
        cb, b = stub_for(servers["b"])
        with ca, cb:
            reply = b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((1, 5))[0], source=servers["a"].address,
                                                              epoch=7), timeout=TIMEOUT_S)
            assert reply.bytes > 3 * 64 * 32 * 4 and reply.seconds > 0
            after = stats(b)
            assert (1, 5) in pairs(after.held) and after.epoch == 7
            assert held(a) == [(1, e) for e in range(8)]  # the source keeps serving it

            from_a, _ = export(a, 1, 5)
            from_b, _ = export(b, 1, 5)
            assert from_b.gate_up_proj.data == from_a.gate_up_proj.data
            assert from_b.down_proj.data == from_a.down_proj.data
            assert from_b.version == from_a.version

            hidden, index, top_w = routing(25, [5], k=1, seed=4)
            out_b = forward(b, 1, hidden, index, top_w)
            assert torch.equal(out_b, forward(a, 1, hidden, index, top_w))
            assert max_err(out_b, expected(weights, 1, hidden, index, top_w)) <= 1e-5

            again = b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((1, 5))[0], source=servers["a"].address,
                                                              epoch=8), timeout=TIMEOUT_S)
            assert again.bytes == 0 and stats(b).epoch == 8


def test_pull_failures_change_nothing(qwen3):
    placement = {**{(1, e): ("a",) for e in range(4)}, **{(0, e): ("b",) for e in range(4)}}
    with running_workers(qwen3, placement) as servers:
        ca, a = stub_for(servers["a"])
        cb, b = stub_for(servers["b"])
        with ca, cb:
            before = stats(b)

            dead = f"127.0.0.1:{free_port()}"
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((1, 2))[0], source=dead, epoch=9), timeout=TIMEOUT_S)
            assert time.monotonic() - start < 5
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dead in caught.value.details()

            with pytest.raises(grpc.RpcError) as caught:  # a holds only experts 0-3 of layer 1
                b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((1, 6))[0], source=servers["a"].address, epoch=9),
                             timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert servers["a"].address in caught.value.details() and "not on this worker" in caught.value.details()

            after = stats(b)
            assert pairs(after.held) == pairs(before.held) == [(0, e) for e in range(4)]
            assert after.epoch == before.epoch == 0
            assert after.rejected == before.rejected + 1  # the FAILED_PRECONDITION; a dead peer is no rejection
            assert held(a) == [(1, e) for e in range(4)]


class FakePeer(worker_pb2_grpc.ExpertWorkerServicer):
    """A peer whose ExportExpert sends what a test tells it to (or hangs until the caller gives up)."""

    def __init__(self, chunks=None):
        self.chunks = chunks
        self.remaining: list[float] = []
        self.ended = threading.Event()

    def ExportExpert(self, request, context):
        self.remaining.append(context.time_remaining())
        if self.chunks is None:  # hang until the caller's deadline or cancellation ends the call
            deadline = time.monotonic() + TIMEOUT_S
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.02)
            self.ended.set()
            return
        yield from self.chunks


@contextlib.contextmanager
def fake_peer(peer: FakePeer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=streaming.GRPC_OPTIONS)
    worker_pb2_grpc.add_ExpertWorkerServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait(timeout=TIMEOUT_S)


def state_chunks(layer, expert, gate_up, down, *, corrupt_crc=False):
    state = worker_pb2.ExpertState(expert=keys((layer, expert))[0], gate_up_proj=encode(gate_up), down_proj=encode(down))
    chunks = list(streaming.split(state.SerializeToString(), chunk_bytes=4096))
    if corrupt_crc:
        chunks[-1].crc32 ^= 1
    return chunks


def test_pull_never_outlives_the_callers_deadline(qwen3):
    """The pull passes the caller's deadline on to the peer: a peer that hangs cannot hold the worker longer."""
    peer = FakePeer()
    with fake_peer(peer) as source, running_workers(qwen3, {(0, 0): ("b",)}) as servers:
        channel, b = stub_for(servers["b"])
        with channel:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((0, 3))[0], source=source, epoch=4), timeout=1.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 5
            assert peer.ended.wait(timeout=5)  # the worker gave up on the peer too
            assert time.monotonic() - start < 6
            assert len(peer.remaining) == 1 and peer.remaining[0] <= 1.5
            now = stats(b)
            assert pairs(now.held) == [(0, 0)] and now.epoch == 0 and now.rejected == 0


@pytest.mark.parametrize("what", ["garbage", "bad-crc", "wrong-expert", "wrong-shape", "bad-dtype"])
def test_pull_from_a_lying_peer_is_data_loss_and_changes_nothing(qwen3, ckpt, what):
    gate_up, down = ckpt.read_expert(0, 3)
    chunks = {
        "garbage": lambda: list(streaming.split(b"\xff" * 5000, chunk_bytes=4096)),
        "bad-crc": lambda: state_chunks(0, 3, gate_up, down, corrupt_crc=True),
        "wrong-expert": lambda: state_chunks(0, 4, gate_up, down),
        "wrong-shape": lambda: state_chunks(0, 3, gate_up[:10], down),
        "bad-dtype": lambda: state_chunks(0, 3, gate_up.to(torch.int32), down),
    }[what]()
    fragment = {"garbage": "not an ExpertState", "bad-crc": "checksum mismatch", "wrong-expert": "asked for (0, 3)",
                "wrong-shape": "has shapes [10, 64]", "bad-dtype": "int32"}[what]
    with fake_peer(FakePeer(chunks)) as source, running_workers(qwen3, {(0, 0): ("b",)}) as servers:
        channel, b = stub_for(servers["b"])
        with channel:
            with pytest.raises(grpc.RpcError) as caught:
                b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((0, 3))[0], source=source, epoch=4), timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.DATA_LOSS
            assert source in caught.value.details() or "peer" in caught.value.details()
            assert fragment in caught.value.details()
            now = stats(b)
            assert pairs(now.held) == [(0, 0)] and now.epoch == 0 and now.rejected == 0


def test_pull_from_an_honest_fake_peer_takes_its_bytes(qwen3, ckpt, weights):
    gate_up, down = ckpt.read_expert(0, 3)
    with fake_peer(FakePeer(state_chunks(0, 3, gate_up, down))) as source, \
            running_workers(qwen3, {(0, 0): ("b",)}) as servers:
        channel, b = stub_for(servers["b"])
        with channel:
            reply = b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((0, 3))[0], source=source, epoch=2),
                                 timeout=TIMEOUT_S)
            assert reply.bytes > 0 and held(b) == [(0, 0), (0, 3)] and stats(b).epoch == 2
            hidden, index, top_w = routing(10, [0, 3], seed=21)
            assert max_err(forward(b, 0, hidden, index, top_w), expected(weights, 0, hidden, index, top_w)) <= 1e-5


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
