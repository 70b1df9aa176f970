"""GenerateStream (frontend/token_stream.py): each row's tokens handed on one at a time as they are
decoded, joined the same tokens as Generate and transformers, in the running batch and decoded alone;
a stream whose call ends early stops its generation, and the SDK's `generate_stream` (over HTTP through
Ray Serve: tests/test_ray.py)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from moecluster.frontend.server import FrontendService
from moecluster.models.checkpoint import Checkpoint
from moecluster.observability.prometheus import parse
from moecluster.protos import frontend_pb2
from moecluster.sdk.client import Client, MoEClusterError
from moecluster.wire.tensors import decode, encode
from test_generation_batching import alone, one_worker
from test_sampling import drawn
from transformers import AutoModelForCausalLM

WAIT_S = 60.0


class Call:
    """A servicer context as gRPC's: its callbacks run when the call ends (`end`), abort raises."""

    def __init__(self):
        self.callbacks = []

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def time_remaining(self) -> float:
        return WAIT_S

    def abort(self, code, details):
        raise grpc.RpcError(f"{code.name}: {details}")

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


def request(rows: list[list[int]], new: int, **sampling) -> frontend_pb2.GenerateRequest:
    return frontend_pb2.GenerateRequest(input_ids=encode(torch.tensor(rows)), max_new_tokens=new, **sampling)


def streamed(service, message) -> tuple[dict[int, list[int]], list[int]]:
    """GenerateStream's tokens joined by row, and the size of each chunk."""
    rows, sizes, call = {}, [], Call()
    for chunk in service.GenerateStream(message, call):
        rows.setdefault(chunk.row, []).extend(chunk.tokens)
        sizes.append(len(chunk.tokens))
    call.end()
    return rows, sizes


def generating() -> int:
    return sum(t.name == "generate-stream" and t.is_alive() for t in threading.enumerate())


def ended_within(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while generating() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not generating()


@pytest.mark.parametrize("family, cache_tokens", [("qwen3_moe", 4096), ("qwen3_moe", 0), ("deepseek_v3", 4096)])
def test_streamed_tokens_come_one_at_a_time_and_join_to_what_generate_answers(checkpoints, family, cache_tokens):
    """In the running batch (qwen3), and decoded alone (the batch off; DeepSeek's MLA)."""
    with one_worker(checkpoints[family]) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(checkpoints[family]), dispatcher, generate_cache_tokens=cache_tokens)
        assert (service.generations is not None) == (family == "qwen3_moe" and cache_tokens > 0)
        try:
            prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]
            greedy, sizes = streamed(service, request(prompts, 7))
            assert greedy == {r: alone(reference, p, 7) for r, p in enumerate(prompts)}
            assert sizes == [1] * 14  # a token a chunk: handed on as decoded, not at the end
            settings = {"do_sample": True, "seed": 8, "temperature": 0.9, "top_k": 10}
            sampled, _ = streamed(service, request(prompts, 6, **settings))
            assert sampled == {r: drawn(reference, p, 6, 8 + r, temperature=0.9, top_k=10) for r, p in enumerate(prompts)}
            whole = decode(service.Generate(request(prompts, 6, **settings), None).sequences)
            assert [whole[r, 5:].tolist() for r in range(2)] == [sampled[0], sampled[1]]
            with pytest.raises(grpc.RpcError, match="INVALID_ARGUMENT: top_p: 0.0"):  # refused before any token
                streamed(service, request(prompts, 3, do_sample=True, top_p=0.0))
        finally:
            if service.generations:
                service.generations.close()
        assert ended_within(WAIT_S)


@pytest.mark.parametrize("family, cache_tokens", [("qwen3_moe", 4096), ("deepseek_v3", 4096)])
def test_a_stream_whose_call_ended_stops_its_generation(checkpoints, family, cache_tokens):
    """The client cancelled (or its deadline passed): gRPC runs the call's callbacks. The batch takes its
    rows out, a generation decoded alone stops at its next token; the next request is answered."""
    new = 4000
    with one_worker(checkpoints[family]) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(checkpoints[family]), dispatcher, generate_cache_tokens=cache_tokens)
        layers = len(Checkpoint(checkpoints[family]).geometry.moe_layers)
        try:
            call = Call()
            stream = service.GenerateStream(request([[5, 6, 7]], new), call)
            first = next(stream)
            assert (first.row, len(first.tokens)) == (0, 1)
            assert generating() == 1  # still decoding: the first token came long before the last
            call.end()  # and the stream is still held, not iterated: gRPC stops reading it
            assert ended_within(WAIT_S), "the generation went on after its call ended"
            if service.generations:
                assert not service.generations._waiting  # taken out of the batch
            served = worker.service.Stats(None, None).requests
            assert served < layers * new / 4, f"{served} worker requests: the generation was not stopped"
            assert service.generated_tokens == 0  # nothing answered
            short, _ = streamed(service, request([[1, 2]], 3))
            assert short == {0: alone(reference, [1, 2], 3)}
            stream.close()
        finally:
            if service.generations:
                service.generations.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])  # in the batch, and decoded alone
def test_a_generate_call_that_ended_stops_its_generation(checkpoints, family):
    """A unary Generate whose client cancelled (or whose deadline passed) stops too, not only a stream."""
    new = 4000
    with one_worker(checkpoints[family]) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(checkpoints[family]), dispatcher)
        layers = len(Checkpoint(checkpoints[family]).geometry.moe_layers)
        call, outcome = Call(), []

        def generate():
            try:
                outcome.append(service.Generate(request([[5, 6, 7]], new), call))
            except grpc.RpcError as err:
                outcome.append(err)

        thread = threading.Thread(target=generate)
        try:
            thread.start()
            deadline = time.monotonic() + WAIT_S
            while worker.service.Stats(None, None).requests < 4 * layers and time.monotonic() < deadline:
                time.sleep(0.02)  # a few tokens in
            call.end()
            thread.join(WAIT_S)
            assert not thread.is_alive(), "the generation went on after its call ended"
            assert len(outcome) == 1 and "CANCELLED" in str(outcome[0]), outcome
            served = worker.service.Stats(None, None).requests
            assert served < layers * new / 4, f"{served} worker requests: the generation was not stopped"
        finally:
            if service.generations:
                service.generations.close()


def test_the_sdk_streams_what_generate_answers(local_clusters, qwen3, tmp_path):
    cluster = local_clusters("streaming", qwen3, 1, 1)
    reference = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with Client(cluster.status()["endpoint"]) as client:
        for settings in [{}, {"do_sample": True, "seed": 3, "top_p": 0.8}]:
            rows = {}
            for row, tokens in client.generate_stream(prompts, max_new_tokens=5, **settings):
                rows.setdefault(row, []).extend(tokens)
            whole = client.generate(prompts, max_new_tokens=5, **settings)
            assert rows == {r: whole[r, 3:].tolist() for r in range(2)}, settings
        assert rows[1] == drawn(reference, [8, 9, 10], 5, 4, top_p=0.8)
        ended = client.generate(prompts, max_new_tokens=5, until_eos=True)  # the tiny checkpoint's EOS is 2
        for r in range(2):  # transformers' generate stops a row at EOS (tests/test_end_of_sequence.py: in full)
            with torch.no_grad():
                theirs = reference.generate(prompts[r:r + 1], attention_mask=torch.ones_like(prompts[r:r + 1]),
                                            max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 3:].tolist()
            assert ended[r, 3:].tolist() == theirs + [0] * (5 - len(theirs))
        chunks = client.generate_stream(prompts[:1], max_new_tokens=4000)
        assert next(chunks)[0] == 0
        chunks.close()  # cancels the call: the frontend stops decoding it
        assert client.generate(prompts[:1], max_new_tokens=2)[0, 3:].tolist() == alone(reference, [5, 6, 7], 2)
        with pytest.raises(MoEClusterError, match="temperature: 0.0, expected more than 0") as refused:
            next(client.generate_stream(prompts, 2, do_sample=True, temperature=0.0))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    metrics = json.loads(next((tmp_path / "home").rglob("frontend.ready")).read_text())["metrics"]
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    first_tokens = [v for name, labels, v in parse(text) if name == "moecluster_frontend_first_token_seconds_count"]
    assert first_tokens == [3.0]  # the two streams read to their end, and the one left after its first tokens
    with pytest.raises(MoEClusterError, match="failed to connect to http://127.0.0.1:1/tiny/GenerateStream") as http:
        next(Client("http://127.0.0.1:1/tiny").generate_stream(prompts, 2))  # Ray Serve's ingress: test_ray.py
    assert http.value.code == grpc.StatusCode.UNAVAILABLE
