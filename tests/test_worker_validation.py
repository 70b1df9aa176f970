"""A real worker process refuses malformed requests, says why, and stays exactly as it was.

One worker subprocess (layer 0 experts 0-5, layer 1 experts 0-7 of the tiny
qwen3_moe checkpoint) serves the whole module. Each malformed request must get
INVALID_ARGUMENT (or FAILED_PRECONDITION for a valid request about an expert
the worker does not hold) with a message naming what was wrong; after each one
a valid Forward must still match the reference math, and the worker's held
experts and epoch must be unchanged while Stats().rejected counts the refusal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import grpc
import pytest
import torch
from moecluster.models.checkpoint import Checkpoint
from moecluster.protos import tensor_pb2, worker_pb2, worker_pb2_grpc
from moecluster.wire import streaming
from moecluster.wire.tensors import encode
from moecluster.workers import validation
from moecluster.workers.kernels import reference_experts

HELD_SPEC = "0:0-5,1:0-7"
HELD = [(0, e) for e in range(6)] + [(1, e) for e in range(8)]
RPC_TIMEOUT_S = 30.0
START_TIMEOUT_S = 90.0
COMMAND_EPOCH = 1000  # carried by every malformed command: a refused command must not move the epoch

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


# -- the worker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(qwen3, tmp_path_factory):
    """One `python -m moecluster.workers.server` process; yields (address, pid)."""
    folder = tmp_path_factory.mktemp("validation-worker")
    ready, log = folder / "ready.json", open(folder / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecluster.workers.server", "--checkpoint", str(qwen3),
         "--experts", HELD_SPEC, "--ready-file", str(ready), "--threads", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"worker exited with {proc.returncode} before serving: {(folder / 'worker.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker did not write {ready} within {START_TIMEOUT_S} s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid
        yield info["address"], info["pid"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def stub(worker):
    channel = grpc.insecure_channel(worker[0], options=streaming.GRPC_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    yield worker_pb2_grpc.ExpertWorkerStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def weights(qwen3):
    """layer -> (gate_up [E, 2I, H], down [E, H, I]) of every expert, read straight from the checkpoint."""
    ckpt = Checkpoint(qwen3)
    out = {}
    for layer in ckpt.geometry.moe_layers:
        pairs = [ckpt.read_expert(layer, e) for e in range(ckpt.geometry.num_experts)]
        out[layer] = (torch.stack([g for g, _ in pairs]), torch.stack([d for _, d in pairs]))
    return out


# -- requests --------------------------------------------------------------------

H = 64  # the tiny checkpoints' hidden size (checked in test_geometry_is_what_the_cases_assume)
E = 8
T = 6


def valid_inputs(layer: int = 0, seed: int = 0):
    """(hidden [T, H], index [T, 2] int32 over held experts and -1, weights [T, 2]) for `layer`."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    index = torch.tensor([[0, 5], [3, -1], [-1, 1], [2, 4], [5, 0], [-1, -1]], dtype=torch.int32)
    weights = torch.rand(T, 2, generator=gen)
    return hidden, index, weights


def forward_request(layer=0, hidden=None, index=None, weights=None, epoch=0) -> worker_pb2.ForwardRequest:
    h, i, w = valid_inputs(layer)
    return worker_pb2.ForwardRequest(
        layer=layer,
        hidden_states=encode(h if hidden is None else hidden),
        top_k_index=encode(i if index is None else index),
        top_k_weights=encode(w if weights is None else weights),
        epoch=epoch,
    )


def raw(dtype: str, shape: list[int], data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def with_hidden(tensor: tensor_pb2.Tensor) -> worker_pb2.ForwardRequest:
    request = forward_request()
    request.hidden_states.CopyFrom(tensor)
    return request


def key(layer: int, expert: int) -> worker_pb2.ExpertKey:
    return worker_pb2.ExpertKey(layer=layer, expert=expert)


def keys(*pairs) -> list[worker_pb2.ExpertKey]:
    return [key(*p) for p in pairs]


def hidden_with(value: float, row: int = 2) -> torch.Tensor:
    hidden = valid_inputs()[0].clone()
    hidden[row, 7] = value
    return hidden


def weights_with(value: float) -> torch.Tensor:
    weights = valid_inputs()[2].clone()
    weights[3, 1] = value
    return weights


def index_with(row: int, values: list[int]) -> torch.Tensor:
    index = valid_inputs()[1].clone()
    index[row] = torch.tensor(values, dtype=torch.int32)
    return index


def int64_index_with(row: int, slot: int, value: int) -> torch.Tensor:
    index = valid_inputs()[1].long()
    index[row, slot] = value
    return index


# -- calling ---------------------------------------------------------------------


def call_forward(stub, request):
    return stub.Forward(request, timeout=RPC_TIMEOUT_S)


def call_stream(stub, chunks):
    return list(stub.ForwardStream(iter(chunks), timeout=RPC_TIMEOUT_S))


def stream_of(request: worker_pb2.ForwardRequest) -> list[tensor_pb2.Chunk]:
    return list(streaming.split(request.SerializeToString()))


def corrupted_stream() -> list[tensor_pb2.Chunk]:
    chunks = list(streaming.split(forward_request().SerializeToString(), chunk_bytes=512))
    assert len(chunks) > 2
    chunks[-1].crc32 ^= 0x5A5A5A5A
    return chunks


def flipped_byte_stream() -> list[tensor_pb2.Chunk]:
    chunks = list(streaming.split(forward_request().SerializeToString(), chunk_bytes=512))
    middle = bytearray(chunks[1].data)
    middle[100] ^= 0xFF
    chunks[1].data = bytes(middle)
    return chunks


def truncated_stream() -> list[tensor_pb2.Chunk]:
    chunks = list(streaming.split(forward_request().SerializeToString(), chunk_bytes=512))
    return chunks[:-1]


def garbage_stream() -> list[tensor_pb2.Chunk]:
    """A payload whose size and CRC check out but which is no ForwardRequest."""
    return list(streaming.split(b"\xff" * 3000, chunk_bytes=1024))


def oversized_announcement() -> list[tensor_pb2.Chunk]:
    first = tensor_pb2.Chunk(data=b"\0" * 16, total_size=1 << 40)
    last = tensor_pb2.Chunk(data=b"\0" * 16, last=True, crc32=zlib.crc32(b"\0" * 32))
    return [first, last]


def more_than_announced() -> list[tensor_pb2.Chunk]:
    chunks = list(streaming.split(forward_request().SerializeToString(), chunk_bytes=512))
    chunks[0].total_size -= 10
    return chunks


def too_many_tokens() -> list[tensor_pb2.Chunk]:
    """MAX_TOKENS + 1 rows of H floats (~17 MB): only ForwardStream can carry it."""
    tokens = validation.MAX_TOKENS + 1
    request = worker_pb2.ForwardRequest(
        layer=0,
        hidden_states=raw("float32", [tokens, H], bytes(tokens * H * 4)),
        top_k_index=raw("int32", [tokens, 2], bytes(tokens * 2 * 4)),
        top_k_weights=raw("float32", [tokens, 2], bytes(tokens * 2 * 4)),
    )
    payload = request.SerializeToString()
    assert len(payload) > streaming.MAX_MESSAGE_BYTES  # would not pass as one unary message
    return list(streaming.split(payload))


# (id, rpc, request factory, expected status, fragment of the message)
CASES = [
    # tensors that cannot be decoded
    ("unknown-dtype", "Forward", lambda: with_hidden(raw("float8", [T, H], bytes(T * H))), INVALID, "unknown dtype 'float8'"),
    ("missing-hidden", "Forward", lambda: worker_pb2.ForwardRequest(layer=0), INVALID, "hidden_states: unknown dtype ''"),
    ("byte-size", "Forward", lambda: with_hidden(raw("float32", [T, H], bytes(T * H * 4 - 4))), INVALID, "bytes do not match shape"),
    ("negative-dim", "Forward", lambda: with_hidden(raw("float32", [-1, H], b"")), INVALID, "negative dimension"),
    ("huge-empty-shape", "Forward", lambda: with_hidden(raw("float32", [1 << 62, 1 << 62, 0], b"")), INVALID, "hidden_states"),
    # hidden_states
    ("int-hidden", "Forward", lambda: forward_request(hidden=torch.ones(T, H, dtype=torch.int32)), INVALID,
     "hidden_states: dtype int32 is not a float type"),
    ("hidden-1d", "Forward", lambda: forward_request(hidden=torch.randn(H)), INVALID, f"shape [{H}], expected [T, {H}]"),
    ("hidden-3d", "Forward", lambda: forward_request(hidden=torch.randn(1, T, H)), INVALID, f"expected [T, {H}]"),
    ("wrong-hidden-size", "Forward", lambda: forward_request(hidden=torch.randn(T, H // 2)), INVALID,
     f"shape [{T}, {H // 2}], expected [T, {H}]"),
    ("too-many-tokens", "ForwardStream", too_many_tokens, INVALID, f"more than the limit of {validation.MAX_TOKENS}"),
    ("nan-hidden", "Forward", lambda: forward_request(hidden=hidden_with(float("nan"))), INVALID,
     "hidden_states: contains NaN or Inf"),
    # top_k_index
    ("float-index", "Forward", lambda: forward_request(index=valid_inputs()[1].float()), INVALID,
     "top_k_index: dtype float32 is not int32 or int64"),
    ("index-rows", "Forward", lambda: forward_request(index=torch.zeros(T + 1, 2, dtype=torch.int32),
                                                      weights=torch.ones(T + 1, 2)), INVALID, f"expected [{T}, K]"),
    ("k-zero", "Forward", lambda: forward_request(index=torch.zeros(T, 0, dtype=torch.int32), weights=torch.ones(T, 0)),
     INVALID, f"1 <= K <= {E}"),
    ("k-over-e", "Forward", lambda: forward_request(index=torch.full((T, E + 1), -1, dtype=torch.int32),
                                                    weights=torch.ones(T, E + 1)), INVALID, f"shape [{T}, {E + 1}]"),
    ("index-1d", "Forward", lambda: forward_request(index=torch.zeros(T, dtype=torch.int32), weights=torch.ones(T)),
     INVALID, "top_k_index: shape"),
    ("expert-minus-2", "Forward", lambda: forward_request(index=index_with(1, [3, -2])), INVALID,
     "expert id -2 is out of range"),
    ("expert-equals-e", "Forward", lambda: forward_request(index=index_with(4, [E, 0])), INVALID,
     f"expert id {E} is out of range"),
    ("expert-huge-int64", "Forward", lambda: forward_request(index=int64_index_with(0, 1, 1 << 40)), INVALID,
     f"expert id {1 << 40} is out of range"),
    ("duplicate-expert", "Forward", lambda: forward_request(index=index_with(3, [4, 4])), INVALID,
     "token 3 lists the same expert twice"),
    # top_k_weights
    ("weights-shape", "Forward", lambda: forward_request(weights=torch.ones(T, 3)), INVALID,
     "top_k_weights: shape [6, 3] differs from top_k_index [6, 2]"),
    ("weights-int", "Forward", lambda: forward_request(weights=torch.ones(T, 2, dtype=torch.int32)), INVALID,
     "top_k_weights: dtype int32 is not a float type"),
    ("inf-weights", "Forward", lambda: forward_request(weights=weights_with(float("inf"))), INVALID,
     "top_k_weights: contains NaN or Inf"),
    # layers
    ("layer-5", "Forward", lambda: forward_request(layer=5), INVALID, "layer 5 has no routed experts"),
    ("layer-minus-1", "Forward", lambda: forward_request(layer=-1), INVALID, "layer -1 has no routed experts"),
    # an expert this worker does not hold: valid request, stale routing
    ("forward-not-held", "Forward", lambda: forward_request(index=index_with(2, [6, 1])), PRECONDITION, "epoch"),
    # ForwardStream framing
    ("stream-bad-crc", "ForwardStream", corrupted_stream, INVALID, "checksum mismatch"),
    ("stream-flipped-byte", "ForwardStream", flipped_byte_stream, INVALID, "checksum mismatch"),
    ("stream-truncated", "ForwardStream", truncated_stream, INVALID, "stream ended before its last chunk"),
    ("stream-oversized", "ForwardStream", oversized_announcement, INVALID, "over the limit"),
    ("stream-more-than-announced", "ForwardStream", more_than_announced, INVALID, "announced"),
    ("stream-not-a-request", "ForwardStream", garbage_stream, INVALID, "ForwardRequest"),
    ("stream-invalid-inside", "ForwardStream", lambda: stream_of(forward_request(index=index_with(1, [3, -2]))),
     INVALID, "expert id -2 is out of range"),
    # LoadExperts
    ("load-empty", "LoadExperts", lambda: worker_pb2.LoadExpertsRequest(epoch=COMMAND_EPOCH), INVALID, "empty list"),
    ("load-unknown-expert", "LoadExperts", lambda: worker_pb2.LoadExpertsRequest(experts=keys((0, 6), (0, E)), epoch=COMMAND_EPOCH),
     INVALID, f"expert {E} is out of range"),
    ("load-unknown-layer", "LoadExperts", lambda: worker_pb2.LoadExpertsRequest(experts=keys((0, 7), (7, 0)), epoch=COMMAND_EPOCH),
     INVALID, "layer 7 has no routed experts"),
    # DropExperts
    ("drop-unknown-expert", "DropExperts", lambda: worker_pb2.DropExpertsRequest(experts=keys((0, 0), (1, -1)), epoch=COMMAND_EPOCH),
     INVALID, "expert -1 is out of range"),
    ("drop-unknown-layer", "DropExperts", lambda: worker_pb2.DropExpertsRequest(experts=keys((1, 0), (2, 0)), epoch=COMMAND_EPOCH),
     INVALID, "layer 2 has no routed experts"),
    # ExportExpert
    ("export-unknown-layer", "ExportExpert", lambda: worker_pb2.ExportExpertRequest(expert=key(3, 0)), INVALID,
     "layer 3 has no routed experts"),
    ("export-unknown-expert", "ExportExpert", lambda: worker_pb2.ExportExpertRequest(expert=key(1, 99)), INVALID,
     "expert 99 is out of range"),
    ("export-not-held", "ExportExpert", lambda: worker_pb2.ExportExpertRequest(expert=key(0, 6)), PRECONDITION,
     "not on this worker"),
    # PullExpert
    ("pull-empty-source", "PullExpert", lambda: worker_pb2.PullExpertRequest(expert=key(0, 7), epoch=COMMAND_EPOCH),
     INVALID, "source: empty"),
    ("pull-unknown-expert", "PullExpert", lambda: worker_pb2.PullExpertRequest(expert=key(0, -3), source="127.0.0.1:1",
                                                                               epoch=COMMAND_EPOCH), INVALID, "expert -3 is out of range"),
]


def send(stub, rpc: str, request):
    if rpc == "Forward":
        return call_forward(stub, request)
    if rpc == "ForwardStream":
        return call_stream(stub, request)
    if rpc == "ExportExpert":
        return list(stub.ExportExpert(request, timeout=RPC_TIMEOUT_S))
    return getattr(stub, rpc)(request, timeout=RPC_TIMEOUT_S)


def held_keys(stats: worker_pb2.StatsResponse) -> list[tuple[int, int]]:
    return [(k.layer, k.expert) for k in stats.held]


def assert_forward_still_right(stub, weights) -> None:
    """A valid Forward on each layer matches reference_experts on the checkpoint's weights."""
    for layer in (0, 1):
        hidden, index, top_w = valid_inputs(layer, seed=layer + 1)
        response = call_forward(stub, forward_request(layer, hidden, index, top_w))
        out = torch.frombuffer(bytearray(response.output.data), dtype=torch.float32).view(list(response.output.shape))
        expected = reference_experts(hidden, *weights[layer], index.long(), top_w)
        assert response.output.dtype == "float32" and list(out.shape) == [T, H]
        assert (out - expected).abs().max().item() <= 1e-5


# -- tests -----------------------------------------------------------------------


def test_geometry_is_what_the_cases_assume(qwen3):
    geometry = Checkpoint(qwen3).geometry
    assert (geometry.hidden, geometry.num_experts, geometry.moe_layers) == (H, E, (0, 1))


def test_worker_holds_what_it_was_started_with(stub, weights):
    stats = stub.Stats(worker_pb2.StatsRequest(), timeout=RPC_TIMEOUT_S)
    assert held_keys(stats) == HELD
    assert stats.epoch == 0 and not stats.draining
    assert_forward_still_right(stub, weights)


def test_enough_distinct_malformed_requests():
    assert len({case[0] for case in CASES}) == len(CASES) >= 24


@pytest.mark.parametrize("rpc, make, code, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_request_is_refused_and_changes_nothing(stub, weights, rpc, make, code, fragment):
    request = make()
    before = stub.Stats(worker_pb2.StatsRequest(), timeout=RPC_TIMEOUT_S)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, rpc, request)
    assert time.monotonic() - start < RPC_TIMEOUT_S
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details()

    after = stub.Stats(worker_pb2.StatsRequest(), timeout=RPC_TIMEOUT_S)
    assert after.rejected == before.rejected + 1
    assert held_keys(after) == held_keys(before) == HELD
    assert after.epoch == before.epoch == 0
    assert after.requests == before.requests  # a refused Forward is not counted as served
    assert list(after.experts) == list(before.experts)  # nor are its tokens
    assert_forward_still_right(stub, weights)
    final = stub.Stats(worker_pb2.StatsRequest(), timeout=RPC_TIMEOUT_S)
    assert held_keys(final) == HELD and final.rejected == after.rejected
    assert final.requests == after.requests + 2


def test_rejections_are_counted_one_each(stub, weights):
    cheap = [c for c in CASES if c[0] != "too-many-tokens"]
    before = stub.Stats(worker_pb2.StatsRequest(), timeout=RPC_TIMEOUT_S)
    for name, rpc, make, code, _ in cheap:
        with pytest.raises(grpc.RpcError) as caught:
            send(stub, rpc, make())
        assert caught.value.code() == code, name
    after = stub.Stats(worker_pb2.StatsRequest(), timeout=RPC_TIMEOUT_S)
    assert after.rejected == before.rejected + len(cheap)
    assert held_keys(after) == HELD and after.epoch == 0 and after.requests == before.requests
    assert_forward_still_right(stub, weights)
