"""Generations that end at the end-of-sequence token (`until_eos`) or at stop tokens beside those that
make exactly N tokens and never pick it: each row as transformers' `generate` of that row alone, greedy
or sampled, streamed or not, in the running batch (both kinds in one batch) and decoded alone."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
import torch
from moecluster.frontend.ending import Ending, EndingError
from moecluster.frontend.server import FrontendService
from moecluster.models.checkpoint import Checkpoint
from moecluster.protos import frontend_pb2
from moecluster.wire.tensors import decode, encode
from test_generation_batching import alone, one_worker
from test_generation_streaming import Call, streamed
from test_sampling import Aborted, at_once, drawn

PROMPT = [6, 19, 60, 44, 63, 69]
NEW = 8


def with_eos(checkpoints, family: str, tmp_path, eos: int | None):
    """A copy of the family's checkpoint whose generation_config.json names `eos` (None: no such token)."""
    path = tmp_path / family
    shutil.copytree(checkpoints[family], path)
    config = json.loads((path / "generation_config.json").read_text())
    config.pop("eos_token_id", None)
    (path / "generation_config.json").write_text(json.dumps(config | ({"eos_token_id": eos} if eos is not None else {})))
    return path


def until_eos(reference, row: list[int], new: int, seed: int | None = None, **sampling) -> list[int]:
    """transformers' own continuation of one row that stops at its end-of-sequence token (or the `eos_token_id`
    given, never making `suppress_tokens`), padded with 0."""
    prompt = torch.tensor([row])
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                 do_sample=seed is not None, pad_token_id=0, **sampling)[0, len(row):].tolist()
    return out + [0] * (new - len(out))


def request(rows, new=NEW, **settings) -> frontend_pb2.GenerateRequest:
    return frontend_pb2.GenerateRequest(input_ids=encode(torch.tensor(rows)), max_new_tokens=new, **settings)


@pytest.mark.parametrize("family, cache_tokens", [("qwen3_moe", 4096), ("qwen3_moe", 0), ("deepseek_v3", 4096)])
def test_a_row_ends_at_its_end_of_sequence_token_as_generate_ends_it(checkpoints, tmp_path, family, cache_tokens):
    with one_worker(checkpoints[family]) as (_, _, reference, _):
        greedy = alone(reference, PROMPT, NEW - 1)
    # EOS: the first token it picks that it did not pick before, after its first: the row ends there
    at = next(i for i in range(1, NEW - 1) if greedy[i] not in greedy[:i])
    eos = greedy[at]
    path = with_eos(checkpoints, family, tmp_path, eos)
    other = [11, 3, 5, 7, 2, 9]
    with one_worker(path) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(path), dispatcher, generate_cache_tokens=cache_tokens)
        try:
            assert list(service.Info(None, None).eos_token_ids) == [eos]  # what a client trims rows at
            ending = request([PROMPT, other], until_eos=True)
            exact = request([PROMPT, other])
            answers = at_once(lambda i: decode(service.Generate([ending, exact][i], None).sequences), 2)  # one batch
            ended, made = answers[0][:, len(PROMPT):].tolist(), answers[1][:, len(PROMPT):].tolist()
            assert ended == [until_eos(reference, row, NEW) for row in (PROMPT, other)]
            assert ended[0][at:] == [eos] + [0] * (NEW - at - 1)  # ended at its EOS, padded as generate pads
            assert made == [alone(reference, row, NEW) for row in (PROMPT, other)]
            assert eos not in made[0] and made[0][:at] == ended[0][:at]
            assert service.generated_tokens == sum(len(r) for r in made) + at + 1 + len(until_eos_made(ended[1], eos))

            for settings in ({"top_k": 1}, {"temperature": 0.7}):  # top_k 1 draws the greedy tokens: the same EOS
                sampled = {"do_sample": True, "seed": 4, **settings}
                drawn_row = decode(service.Generate(request([PROMPT], **sampled, until_eos=True), None).sequences)
                assert drawn_row[0, len(PROMPT):].tolist() == until_eos(reference, PROMPT, NEW, 4, **settings)
                assert drawn_row[0, len(PROMPT) + at] == eos or "top_k" not in settings
                sampled_exact = decode(service.Generate(request([PROMPT], **sampled), None).sequences)
                assert sampled_exact[0, len(PROMPT):].tolist() == drawn(reference, PROMPT, NEW, 4, **settings)

            rows, sizes = streamed(service, request([PROMPT, other], until_eos=True))
            assert rows == {0: ended[0][:at + 1], 1: until_eos_made(ended[1], eos)}  # no padding streamed
        finally:
            if service.generations:
                service.generations.close()


def test_ending_settings_are_generates_and_bad_ones_are_refused():
    assert Ending.of((2,)) == Ending(stops=(), never=(2,))  # exactly N: EOS suppressed
    assert Ending.of((2,), until_eos=True) == Ending(stops=(2,), never=())
    assert Ending.of((2,), stop_tokens=[7, 9]) == Ending(stops=(7, 9), never=(2,))
    assert Ending.of((2,), stop_tokens=[2, 7]) == Ending(stops=(2, 7), never=())  # named a stop: not suppressed
    assert Ending.of((2,), until_eos=True, stop_tokens=[7, 2]) == Ending(stops=(2, 7), never=())
    ending = Ending.of((2,), stop_tokens=[7])
    assert (ending.made([5, 7, 0, 0]), ending.made([5, 6]), ending.ended([5, 7]), ending.ended([7, 5])) == (2, 2, True, False)
    for kwargs, message in [({"until_eos": True, "eos": ()}, "names no end-of-sequence token"),
                            ({"stop_tokens": [128]}, r"stop_tokens: \[128\] are not token ids of this model \(0..127\)"),
                            ({"stop_tokens": [-1]}, r"\[-1\] are not"), ({"stop_tokens": range(65)}, "65, at most 64")]:
        with pytest.raises(EndingError, match=message):
            Ending.of(kwargs.pop("eos", (2,)), vocab=128, **kwargs)


@pytest.mark.parametrize("family, cache_tokens", [("qwen3_moe", 4096), ("deepseek_v3", 4096)])
def test_a_row_ends_at_a_stop_token_and_never_makes_the_end_of_sequence_one(checkpoints, family, cache_tokens):
    with one_worker(checkpoints[family]) as (model, dispatcher, reference, worker):
        greedy = alone(reference, PROMPT, NEW - 1)
        at = next(i for i in range(1, NEW - 1) if greedy[i] not in greedy[:i])
        stop, eos = greedy[at], reference.generation_config.eos_token_id
        service = FrontendService(Checkpoint(checkpoints[family]), dispatcher, generate_cache_tokens=cache_tokens)
        try:
            for settings in ({}, {"do_sample": True, "seed": 2, "top_k": 1}):  # top_k 1: the greedy tokens, drawn
                out = decode(service.Generate(request([PROMPT], stop_tokens=[stop], **settings), None).sequences)
                theirs = until_eos(reference, PROMPT, NEW, settings.get("seed"), eos_token_id=[stop],
                                   suppress_tokens=[eos], **({"top_k": 1} if settings else {}))
                assert out[0, len(PROMPT):].tolist() == theirs, settings
                assert theirs[at:] == [stop] + [0] * (NEW - at - 1)
            rows, _ = streamed(service, request([PROMPT], stop_tokens=[stop]))
            assert rows == {0: greedy[:at + 1]}
            context = Aborted()
            with pytest.raises(grpc.RpcError):
                service.Generate(request([PROMPT], stop_tokens=[reference.config.vocab_size]), context)
            assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "are not token ids" in context.details
        finally:
            if service.generations:
                service.generations.close()


def until_eos_made(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_until_eos_on_a_checkpoint_without_such_a_token_is_refused(checkpoints, tmp_path):
    path = with_eos(checkpoints, "qwen3_moe", tmp_path, None)
    with one_worker(path) as (model, dispatcher, reference, worker):
        service = FrontendService(Checkpoint(path), dispatcher)
        try:
            for call in (lambda c: service.Generate(request([PROMPT], until_eos=True), c),
                         lambda c: list(service.GenerateStream(request([PROMPT], until_eos=True), c))):
                context = Aborted()
                context.add_callback = Call().add_callback
                with pytest.raises(grpc.RpcError):
                    call(context)
                assert context.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "names no end-of-sequence token" in context.details
            assert list(service.Info(None, None).eos_token_ids) == []
            exact = decode(service.Generate(request([PROMPT]), None).sequences)[0, len(PROMPT):].tolist()
            assert exact == alone(reference, PROMPT, NEW)
        finally:
            service.generations.close()
