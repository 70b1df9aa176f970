"""Copying experts between workers: ExportExpert's checksummed stream, PullExpert over the bulk side
channel (and its fallback to the stream), and peers that hang, lie or break off."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import zlib
from concurrent import futures

import grpc
import pytest
import torch
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import bulk, streaming
from moecluster.wire.bulk import BulkSender
from moecluster.wire.tensors import decode, encode
from shared import running_workers
from worker_helpers import TIMEOUT_S, expected, export, forward, free_port, held, keys, max_err, pairs, routing, stats, stub_for

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
            assert reply.bytes == 3 * 64 * 32 * 4 and reply.seconds > 0  # raw weight bytes over the bulk side channel
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
    """A peer whose ExportExpert sends what a test tells it to (or hangs until the caller gives up),
    and whose OfferExpert answers `offer(request)` (default: UNIMPLEMENTED, a peer without a side channel)."""

    def __init__(self, chunks=None, offer=None):
        self.chunks = chunks
        self.offer = offer
        self.remaining: list[float] = []
        self.ended = threading.Event()

    def OfferExpert(self, request, context):
        if self.offer is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no bulk side channel")
        return self.offer(request)

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
            # the caller's 1.5 s, not the worker's own 120 s (gRPC rounds the timeout header up: 1.509 was seen)
            assert len(peer.remaining) == 1 and peer.remaining[0] <= 1.6
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



# -- the bulk side channel -----------------------------------------------------------


def test_pull_falls_back_to_the_stream_when_the_bulk_port_cannot_be_reached(qwen3, ckpt, weights):
    gate_up, down = ckpt.read_expert(0, 3)
    sender = BulkSender("127.0.0.1", 0).start()
    ticket = sender.offer([gate_up, down])
    sender.close()
    closed = socket.socket()  # bound, never listening: connecting is refused, and nobody else can take the port
    closed.bind(("127.0.0.1", 0))
    ticket.port = closed.getsockname()[1]

    def offer(request):
        return worker_pb2.ExpertOffer(expert=request.expert, ticket=ticket)

    with closed, fake_peer(FakePeer(state_chunks(0, 3, gate_up, down), offer)) as source, \
            running_workers(qwen3, {(0, 0): ("b",)}) as servers:
        channel, b = stub_for(servers["b"])
        with channel:
            b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((0, 3))[0], source=source, epoch=2), timeout=TIMEOUT_S)
            assert held(b) == [(0, 0), (0, 3)]
            hidden, index, top_w = routing(10, [0, 3], seed=22)
            assert max_err(forward(b, 0, hidden, index, top_w), expected(weights, 0, hidden, index, top_w)) <= 1e-5


@pytest.mark.parametrize("what", ["wrong-expert", "wrong-shape", "wrong-count", "bad-digest", "taken"])
def test_pull_from_a_lying_bulk_peer_is_data_loss_and_changes_nothing(qwen3, ckpt, what):
    gate_up, down = ckpt.read_expert(0, 3)
    sender = BulkSender("127.0.0.1", 0).start()
    fragment = {"wrong-expert": "asked for (0, 3)", "wrong-shape": "has shapes [10, 64]", "wrong-count": "3 tensors",
                "bad-digest": "digest mismatch", "taken": "ended after 0"}[what]

    def offer(request):
        key = keys((0, 4))[0] if what == "wrong-expert" else request.expert
        tensors = {"wrong-shape": [gate_up[:10], down], "wrong-count": [gate_up, down, down]}.get(what, [gate_up, down])
        ticket = sender.offer(tensors)
        if what == "bad-digest":
            ticket.digest ^= 1
        if what == "taken":  # someone else fetched it first
            with socket.create_connection(("127.0.0.1", ticket.port)) as thief:
                thief.sendall(ticket.token)
                while thief.recv(1 << 16):
                    pass
        return worker_pb2.ExpertOffer(expert=key, ticket=ticket)

    try:
        with fake_peer(FakePeer(None, offer)) as source, running_workers(qwen3, {(0, 0): ("b",)}) as servers:
            channel, b = stub_for(servers["b"])
            with channel:
                with pytest.raises(grpc.RpcError) as caught:
                    b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((0, 3))[0], source=source, epoch=4),
                                 timeout=TIMEOUT_S)
                assert caught.value.code() == grpc.StatusCode.DATA_LOSS
                assert fragment in caught.value.details()
                now = stats(b)
                assert pairs(now.held) == [(0, 0)] and now.epoch == 0 and now.rejected == 0
    finally:
        sender.close()


def test_offer_expert_refuses_what_it_does_not_hold(full_worker):
    with pytest.raises(grpc.RpcError) as caught:
        full_worker.OfferExpert(worker_pb2.ExportExpertRequest(expert=keys((5, 0))[0]), timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_offer_is_what_was_held_even_if_the_expert_is_dropped_and_its_slot_wanted(qwen3, ckpt):
    """OfferExpert sends the held slot without copying it: a drop and new loads while the offer is
    pending must not reuse that slot."""
    with running_workers(qwen3, {(0, e): ("a",) for e in range(4)}) as servers:
        channel, a = stub_for(servers["a"])
        with channel:
            offer = a.OfferExpert(worker_pb2.ExportExpertRequest(expert=keys((0, 2))[0]), timeout=TIMEOUT_S)
            a.DropExperts(worker_pb2.DropExpertsRequest(experts=keys((0, 2)), epoch=1), timeout=TIMEOUT_S)
            a.LoadExperts(worker_pb2.LoadExpertsRequest(experts=keys((0, 5), (0, 6)), epoch=1), timeout=TIMEOUT_S)
            gate_up, down = bulk.receive("127.0.0.1", offer.ticket, timeout=TIMEOUT_S, limit_bytes=1 << 30)
            expected_gate_up, expected_down = ckpt.read_expert(0, 2)
            assert torch.equal(gate_up, expected_gate_up) and torch.equal(down, expected_down)
            assert held(a) == [(0, 0), (0, 1), (0, 3), (0, 5), (0, 6)]
