"""Sampled generation (frontend/sampling.py): row r of a request draws what `torch.manual_seed(seed + r)`
then transformers' `generate(do_sample=True)` of that row alone draws, with the request's temperature,
top_k and top_p (else the checkpoint's, else transformers' defaults), whether the frontend decodes it
in the running batch beside greedy and other sampled requests or alone, and however many requests
it decodes at once."""

from __future__ import annotations

import json
import shutil
import threading

import grpc
import pytest
import torch
from moecluster.frontend.generation_batcher import BATCHED_FAMILIES, GenerationBatcher
from moecluster.frontend.sampling import Sampling, SamplingError
from moecluster.frontend.server import FrontendService
from moecluster.models.checkpoint import Checkpoint
from moecluster.protos import frontend_pb2
from moecluster.sdk.client import Client, MoEClusterError
from moecluster.wire.tensors import decode, encode
from test_generation_batching import TIMEOUT_S, alone, one_worker
from transformers import AutoModelForCausalLM, GenerationConfig


def drawn(reference, row: list[int], new_tokens: int, seed: int, **settings) -> list[int]:
    """transformers' own sampled continuation of one row, under torch's global seed."""
    prompt = torch.tensor([row])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=True, pad_token_id=0, **settings)
    return out[0, len(row):].tolist()


def expected(reference, request) -> list[list[int]]:
    rows, new, settings = request
    if settings is None:
        return [alone(reference, row, new) for row in rows]
    seed = settings["seed"]
    given = {k: v for k, v in settings.items() if k != "seed"}
    return [drawn(reference, row, new, seed + r, **given) for r, row in enumerate(rows)]


def at_once(call, count: int) -> dict[int, object]:
    """call(i) for i < count in threads started together -> {i: its answer}; fails with the first error."""
    answers, failures = {}, []
    start = threading.Barrier(count)

    def client(i):
        try:
            start.wait(TIMEOUT_S)
            answers[i] = call(i)
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(repr(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not failures and len(answers) == count, failures
    return answers


def test_settings_left_out_are_the_checkpoints_then_transformers_defaults():
    own = GenerationConfig(temperature=0.6, top_p=0.95)
    assert Sampling.resolve(own, 3) == Sampling(temperature=0.6, top_k=50, top_p=0.95, seed=3)
    assert Sampling.resolve(GenerationConfig(), 0) == Sampling(1.0, 50, 1.0, 0)
    assert Sampling.resolve(own, 3, temperature=1.5, top_k=0, top_p=1.0) == Sampling(1.5, 0, 1.0, 3)
    assert [type(w).__name__ for w in Sampling(0.5, 4, 0.9, 0).warpers()] == [
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]  # generate's order
    assert Sampling(1.0, 0, 1.0, 0).warpers() == []  # nothing to warp: plain softmax
    for bad, message in [({"temperature": 0.0}, "temperature: 0.0, expected more than 0"),
                         ({"temperature": -1.0}, "temperature: -1.0"), ({"top_k": -1}, "top_k: -1, expected 0"),
                         ({"top_p": 0.0}, "top_p: 0.0, expected more than 0 and at most 1"), ({"top_p": 1.5}, "top_p: 1.5")]:
        with pytest.raises(SamplingError, match=message):
            Sampling.resolve(own, 0, **bad)


@pytest.mark.parametrize("family", BATCHED_FAMILIES)
def test_sampled_and_greedy_requests_decoded_together_each_draw_what_transformers_draws(checkpoints, family):
    gen = torch.Generator().manual_seed(11)
    with one_worker(checkpoints[family]) as (model, dispatcher, reference, worker):
        vocab = reference.config.vocab_size
        requests = [([torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths], new, settings)
                    for lengths, new, settings in [
                        ((4, 9), 8, {"seed": 5, "temperature": 0.8, "top_k": 6, "top_p": 0.9}),
                        ((6,), 7, None),  # greedy, in the same batch
                        ((3, 3), 6, {"seed": 5}),  # the same seed as the first: rows draw their own numbers
                        ((11,), 9, {"seed": 123, "temperature": 1.7, "top_k": 0}),
                        ((2,), 5, {"seed": 9, "top_p": 0.5})]]
        batcher = GenerationBatcher(model, cache_tokens=1024, step_tokens=64)

        def generate(i):
            rows, new, settings = requests[i]
            sampling = None
            if settings is not None:
                sampling = Sampling.resolve(model.generation_config, settings["seed"],
                                            **{k: v for k, v in settings.items() if k != "seed"})
            return batcher.generate(rows, new, timeout=TIMEOUT_S, sampling=sampling)

        try:
            answers = at_once(generate, len(requests))
            again = generate(0)  # alone in the batch now: the same draws
        finally:
            batcher.close()
        served = worker.service.Stats(None, None).requests
    for i, request in enumerate(requests):
        assert answers[i] == expected(reference, request), f"request {i}"
    assert again == answers[0]
    assert answers[0][0] != answers[2][0][:6]  # not one stream for every request
    layers = len(Checkpoint(checkpoints[family]).geometry.moe_layers)
    one_by_one = layers * (sum(new for rows, new, _ in requests for _ in rows) + 8 * 2)
    assert served < one_by_one / 2, f"{served} worker requests for {one_by_one} one by one: not decoded together"


def sampled(rows: list[list[int]], new: int, seed: int, **settings) -> frontend_pb2.GenerateRequest:
    return frontend_pb2.GenerateRequest(input_ids=encode(torch.tensor(rows)), max_new_tokens=new, do_sample=True,
                                        seed=seed, **settings)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_requests_decoded_alone_keep_their_seeds_while_others_are_sampled(checkpoints, family):
    """DeepSeek's generations are decoded alone (MLA), and so is a request larger than the batch's cache:
    before, each seeded torch's global generator, so requests sampled at once took each other's numbers."""
    with one_worker(checkpoints[family]) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(checkpoints[family]), dispatcher, generate_cache_tokens=32)
        try:
            requests = [sampled([[i + 1, 7, 3, 9] * 8], 6, seed=40 + i, **({"temperature": 0.7} if i % 2 else {}))
                        for i in range(4)]  # 32 + 6 tokens: more than the cache holds
            assert service.generations is None or not service.generations.fits(32, 6)
            answers = at_once(lambda i: decode(service.Generate(requests[i], None).sequences)[0, 32:].tolist(), 4)
            assert service.generations is None or service.generations._manager is None  # all decoded alone
        finally:
            if service.generations:
                service.generations.close()
    for i in range(4):
        settings = {"temperature": 0.7} if i % 2 else {}
        assert answers[i] == drawn(reference, [i + 1, 7, 3, 9] * 8, 6, 40 + i, **settings), f"request {i}"


def test_a_checkpoints_sampling_defaults_are_used_and_bad_settings_are_refused(checkpoints, tmp_path):
    path = tmp_path / "qwen3"
    shutil.copytree(checkpoints["qwen3_moe"], path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "temperature": 0.4,
                                                             "top_k": 5, "top_p": 0.8}))
    with one_worker(path) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(path), dispatcher)
        try:
            assert service.model.generation_config.top_k == 5  # read from the checkpoint, as from_pretrained does
            for row, new in [([3, 1, 4], 6), ([2, 7] * 12, 3)]:
                reply = service.Generate(sampled([row], new, seed=2), None)
                assert decode(reply.sequences)[0, len(row):].tolist() == drawn(reference, row, new, 2), row
            greedy = frontend_pb2.GenerateRequest(input_ids=encode(torch.tensor([[3, 1, 4]])), max_new_tokens=4)
            assert decode(service.Generate(greedy, None).sequences)[0, 3:].tolist() == alone(reference, [3, 1, 4], 4)
            for request, message in [
                    (sampled([[1]], 2, 0, temperature=0.0), "temperature: 0.0, expected more than 0"),
                    (sampled([[1]], 2, 0, top_p=2.0), "top_p: 2.0, expected more than 0 and at most 1"),
                    (sampled([[1]], 2, 0, top_k=-3), "top_k: -3"),
                    (frontend_pb2.GenerateRequest(input_ids=encode(torch.tensor([[1]])), max_new_tokens=2, top_k=4),
                     "top_k: for sampled requests only")]:
                context = Aborted()
                with pytest.raises(grpc.RpcError):
                    service.Generate(request, context)
                assert context.code == grpc.StatusCode.INVALID_ARGUMENT and message in context.details, context.details
        finally:
            service.generations.close()


class Aborted:
    """A servicer context that records its abort, as grpc's raises."""

    code = details = None

    def abort(self, code, details):
        self.code, self.details = code, details
        raise grpc.RpcError(details)


def test_the_sdk_sends_the_settings_and_a_frontend_refuses_what_it_cannot_take(local_clusters, qwen3):
    cluster = local_clusters("sampling", qwen3, 1, 1)
    reference = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    with Client(cluster.status()["endpoint"]) as client:
        out = client.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=5, do_sample=True, seed=70,
                              temperature=0.9, top_k=8, top_p=0.95)
        for r, row in enumerate([[5, 6, 7], [8, 9, 10]]):
            assert out[r, 3:].tolist() == drawn(reference, row, 5, 70 + r, temperature=0.9, top_k=8, top_p=0.95)
        with pytest.raises(MoEClusterError, match="temperature: -0.5, expected more than 0") as refused:
            client.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=True, temperature=-0.5)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
