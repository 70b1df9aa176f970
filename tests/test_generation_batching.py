"""Generations decoded together (frontend/generation_batcher.py; sampled ones: test_sampling.py): the same tokens as
transformers' `generate` for each request alone, fewer forwards than decoding them one by one,
requests it does not take decoded alone, and a batch that failed with a lost expert does not
stop the next one."""

from __future__ import annotations

import contextlib
import logging
import threading

import pytest
import torch
from moecluster.controller.static_placement import static_placement
from moecluster.frontend.generation_batcher import BATCHED_FAMILIES, GenerationBatcher, GenerationFailed
from moecluster.frontend.routing import RoutingTable
from moecluster.frontend.server import FrontendService
from moecluster.models.checkpoint import Checkpoint
from moecluster.protos import frontend_pb2
from moecluster.wire.tensors import decode, encode
from shared import running_workers
from test_equivalence import cluster_model
from transformers import AutoModelForCausalLM
from transformers.generation.continuous_batching import cb_logits_processors

TIMEOUT_S = 120.0


@contextlib.contextmanager
def one_worker(path):
    """(the cluster's model, its dispatcher, transformers' model, the worker) with every expert on one worker."""
    geometry = Checkpoint(path).geometry
    placement = static_placement(geometry.moe_layers, geometry.num_experts, ["w"])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with running_workers(path, placement) as servers:
        model, dispatcher = cluster_model(path, servers, placement)
        try:
            yield model, dispatcher, reference, servers["w"]
        finally:
            dispatcher.close()


def alone(reference, row: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy continuation of one row."""
    prompt = torch.tensor([row])
    with torch.no_grad():
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(row):].tolist()


@pytest.mark.parametrize("family", BATCHED_FAMILIES)
def test_generations_decoded_together_equal_each_decoded_alone_by_transformers(checkpoints, family):
    gen = torch.Generator().manual_seed(7)
    with one_worker(checkpoints[family]) as (model, dispatcher, reference, worker):
        requests = [([torch.randint(0, reference.config.vocab_size, (n,), generator=gen).tolist() for n in lengths], new)
                    for lengths, new in [((4, 9), 8), ((1,), 5), ((12, 3, 6), 10), ((7,), 1)]]
        batcher = GenerationBatcher(model, cache_tokens=1024, step_tokens=64)
        answers, failures = {}, []

        def client(i):
            try:
                answers[i] = batcher.generate(*requests[i], timeout=TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - reported below
                failures.append(repr(err))

        try:
            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT_S)
        finally:
            batcher.close()
        served = worker.service.Stats(None, None).requests
    assert not failures and len(answers) == len(requests), failures
    for i, (rows, new) in enumerate(requests):
        assert answers[i] == [alone(reference, row, new) for row in rows], f"request {i}"
    layers = len(Checkpoint(checkpoints[family]).geometry.moe_layers)
    one_by_one = layers * sum(new for rows, new in requests for _ in rows)  # a forward per token
    assert served < one_by_one / 2, f"{served} worker requests for {one_by_one} one by one: not decoded together"


def test_the_end_of_sequence_token_is_never_generated_as_generate_with_min_new_tokens_does(checkpoints):
    prompt = [6, 19, 60, 44, 63, 69]
    with one_worker(checkpoints["qwen3_moe"]) as (model, dispatcher, reference, worker):
        with torch.no_grad():
            eos = int(reference(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())  # the token it would pick
        reference.generation_config.eos_token_id = model.generation_config.eos_token_id = eos
        batcher = GenerationBatcher(model, cache_tokens=256)
        # at a frontend's verbosity, continuous batching's doubt about the suppression is not logged
        warned = Recorder()
        processors = cb_logits_processors.logger
        level = processors.level
        processors.setLevel(logging.WARNING)
        processors.addHandler(warned)
        try:
            [tokens] = batcher.generate([prompt], 6, timeout=TIMEOUT_S)
        finally:
            processors.removeHandler(warned)
            processors.setLevel(level)
            batcher.close()
    assert tokens == alone(reference, prompt, 6) and eos not in tokens
    assert not [m for m in warned.messages if "might not be supported" in m], warned.messages


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_frontend_decodes_alone_what_the_batch_does_not_take(checkpoints):
    with one_worker(checkpoints["qwen3_moe"]) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(checkpoints["qwen3_moe"]), dispatcher, generate_cache_tokens=64)
        try:
            assert service.generations.capacity == 64 and service.generations.fits(54, 10)
            assert not service.generations.fits(60, 5)
            prompt = [3, 1, 4, 1, 5, 9, 2, 6] * 8  # 64 tokens: with 5 more it does not fit the cache
            request = frontend_pb2.GenerateRequest(input_ids=encode(torch.tensor([prompt])), max_new_tokens=5)
            reply = service.Generate(request, None)
            assert decode(reply.sequences)[0, 64:].tolist() == alone(reference, prompt, 5)
            assert service.generations._manager is None  # decoded by model.generate: the batch never started
            short = frontend_pb2.GenerateRequest(input_ids=encode(torch.tensor([[1, 2]])), max_new_tokens=3)
            assert decode(service.Generate(short, None).sequences)[0, 2:].tolist() == alone(reference, [1, 2], 3)
            assert service.generations._manager is not None
        finally:
            service.close()
    with one_worker(checkpoints["deepseek_v3"]) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(checkpoints["deepseek_v3"]), dispatcher)
        assert service.generations is None  # MLA: the paged cache cannot hold it
        request = frontend_pb2.GenerateRequest(input_ids=encode(torch.tensor([[4, 2]])), max_new_tokens=3)
        assert decode(service.Generate(request, None).sequences)[0, 2:].tolist() == alone(reference, [4, 2], 3)


def test_a_batch_that_lost_its_expert_fails_its_requests_and_the_next_batch_runs(checkpoints):
    with one_worker(checkpoints["qwen3_moe"]) as (model, dispatcher, reference, worker):
        batcher = GenerationBatcher(model, cache_tokens=256, step_tokens=64)
        try:
            assert batcher.generate([[1, 2, 3]], 4, timeout=TIMEOUT_S) == [alone(reference, [1, 2, 3], 4)]
            first = batcher._manager
            with pytest.raises(TimeoutError, match="no generation within"):  # given up on: cancelled in the batch
                batcher.generate([[7, 8, 9]], 64, timeout=0.01)
            assert batcher.generate([[1, 2, 3]], 4, timeout=TIMEOUT_S) == [alone(reference, [1, 2, 3], 4)]
            good = dispatcher.table
            placement = good.replicas
            dispatcher.update(RoutingTable(good.epoch + 1, {"w": "127.0.0.1:1"}, placement))  # nobody listens there
            with pytest.raises(GenerationFailed, match="batched generation loop|unavailable|no live"):
                batcher.generate([[1, 2, 3]], 4, timeout=TIMEOUT_S)
            dispatcher.update(RoutingTable(good.epoch + 2, good.workers, placement))
            assert batcher.generate([[5, 6]], 3, timeout=TIMEOUT_S) == [alone(reference, [5, 6], 3)]
            assert batcher._manager is not first and not first.is_running()  # the failed loop was replaced
        finally:
            batcher.close()
