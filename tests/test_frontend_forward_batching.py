"""Forward requests computed together at the frontend (frontend/forward_batcher.py): each answer equals
transformers' forward of that request alone, rows of other lengths padded beside it change none of its logits,
queued requests share one forward per length bucket (so one RPC per worker per layer), a failed forward fails its
requests and not the next, and the frontend's settings reach it."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from moecluster.frontend.dispatcher import ExpertUnavailableError
from moecluster.frontend.forward_batcher import ForwardBatcher, length_bucket, pad_together, split_back
from moecluster.frontend.routing import RoutingTable
from moecluster.frontend.server import DEFAULT_FORWARD_BATCH_TOKENS, FrontendService
from moecluster.models.checkpoint import Checkpoint
from moecluster.protos import frontend_pb2
from moecluster.wire.tensors import decode, encode
from shared import FAMILIES
from test_generation_batching import one_worker

TOLERANCE = 1e-4  # as tests/test_equivalence.py: the cluster against transformers
TIMEOUT_S = 120.0


def test_a_length_bucket_holds_lengths_under_twice_its_shortest():
    buckets: dict[int, list[int]] = {}
    for length in range(1, 1025):
        buckets.setdefault(length_bucket(length), []).append(length)
    assert [min(b) for b in buckets.values()][:6] == [1, 2, 3, 5, 9, 17]
    assert all(max(b) < 2 * min(b) or max(b) == 2 == 2 * min(b) for b in buckets.values())
    assert all(max(b) == 2 ** k for k, b in buckets.items())


def test_rows_padded_together_split_back_to_their_own():
    rows = [torch.tensor([[1, 2, 3]]), torch.tensor([[4], [5]]), torch.tensor([[6, 7, 8, 9]])]
    padded = pad_together(rows)
    assert padded.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 0, 0, 0], [6, 7, 8, 9]]
    back = split_back(padded.unsqueeze(-1), rows)  # [B, T, 1]: each token's own id as its "logit"
    assert [b.squeeze(-1).tolist() for b in back] == [r.tolist() for r in rows]


class Gate:
    """The model's forward, held at a gate until `open()`: the first forwards occupy the batcher's threads while
    the test queues the requests that must go together."""

    def __init__(self, model):
        self.model, self.opened, self.entered = model, threading.Event(), threading.Semaphore(0)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.entered.release()
        assert self.opened.wait(TIMEOUT_S), "the gate was never opened"
        with torch.no_grad():
            return self.model(input_ids=ids).logits.float()

    def open(self) -> None:
        self.opened.set()


def run_queued(batcher: ForwardBatcher, gate: Gate, requests: list[torch.Tensor]):
    """The first two requests computed alone (holding both threads at the gate), the rest queued behind them in
    order, then the gate opened: -> (answers by index, failures)."""
    answers, failures = {}, []

    def client(i):
        try:
            answers[i] = batcher.forward(requests[i])
        except Exception as err:  # noqa: BLE001 - reported by the test
            failures.append((i, err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for i, thread in enumerate(threads):
        thread.start()
        if i < 2:  # on a thread of its own before the next one arrives
            assert gate.entered.acquire(timeout=TIMEOUT_S)
        else:  # queued in this order
            deadline = time.monotonic() + TIMEOUT_S
            while batcher.queued() < i - 1 and time.monotonic() < deadline:
                time.sleep(0.005)
    gate.open()
    for thread in threads:
        thread.join(TIMEOUT_S)
    return answers, failures


@pytest.mark.parametrize("family", FAMILIES)
def test_queued_forwards_go_together_by_length_and_each_equals_transformers_alone(checkpoints, family):
    gen = torch.Generator().manual_seed(11)
    with one_worker(checkpoints[family]) as (model, dispatcher, reference, worker):
        vocab = reference.config.vocab_size
        shapes = [(1, 6), (2, 3),  # computed alone, at the gate
                  (1, 5), (2, 8), (1, 3), (1, 7), (3, 16), (1, 9), (1, 4)]  # buckets 3, 3, 2, 3, 4, 4, 2
        requests = [torch.randint(0, vocab, shape, generator=gen) for shape in shapes]
        gate = Gate(model)
        batcher = ForwardBatcher(gate, max_tokens=256)
        before = worker.service.Stats(None, None).requests
        try:
            answers, failures = run_queued(batcher, gate, requests)
        finally:
            batcher.close()
        served = worker.service.Stats(None, None).requests - before
        assert not failures and len(answers) == len(requests), failures
        for i, ids in enumerate(requests):
            with torch.no_grad():
                expected = reference(input_ids=ids).logits.float()
            assert answers[i].shape == expected.shape, f"request {i}"
            error = (answers[i] - expected).abs().max().item()
            assert error <= TOLERANCE, f"request {i} {list(ids.shape)}: max abs error {error:.3g}"
        # 2 alone, then one forward per bucket of the queue (3, 2, 4): the oldest's bucket takes all of its own
        assert (batcher.forwards, batcher.requests) == (5, 9)
        layers = len(Checkpoint(checkpoints[family]).geometry.moe_layers)
        assert served == 5 * layers, f"{served} worker requests: one per layer of each of the 5 forwards"


def test_padding_changes_no_logit_of_a_shorter_row(checkpoints):
    """Against the cluster's own forward of the row alone, tighter than against transformers."""
    with one_worker(checkpoints["mixtral"]) as (model, dispatcher, reference, worker):
        short, long = torch.tensor([[5, 9, 2]]), torch.tensor([[7, 1, 8, 3], [2, 2, 6, 4]])
        with torch.no_grad():
            alone = model(input_ids=short).logits
            together = split_back(model(input_ids=pad_together([short, long])).logits, [short, long])[0]
        assert together.shape == alone.shape
        assert (together - alone).abs().max().item() <= 1e-5


def test_a_failed_forward_fails_its_requests_and_the_next_forward_runs(checkpoints):
    with one_worker(checkpoints["qwen3_moe"]) as (model, dispatcher, reference, worker):
        gate = Gate(model)
        batcher = ForwardBatcher(gate, max_tokens=16)
        try:
            good = dispatcher.table
            dispatcher.update(RoutingTable(good.epoch + 1, {"w": "127.0.0.1:1"}, good.replicas))  # nobody listens there
            requests = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]]), torch.tensor([[6, 7, 8]]),
                        torch.tensor([[9, 10, 11, 12]])]
            answers, failures = run_queued(batcher, gate, requests)
            assert not answers and sorted(i for i, _ in failures) == [0, 1, 2, 3]
            assert all(isinstance(err, ExpertUnavailableError) for _, err in failures), failures
            assert (batcher.forwards, batcher.requests) == (3, 4)  # 2 alone, then 3 and 4 tokens together

            dispatcher.update(RoutingTable(good.epoch + 2, good.workers, good.replicas))
            big = torch.randint(0, reference.config.vocab_size, (2, 12))  # 24 tokens: more than one forward takes
            with torch.no_grad():
                for ids in (torch.tensor([[1, 2, 3]]), big):
                    error = (batcher.forward(ids) - reference(input_ids=ids).logits).abs().max().item()
                    assert error <= TOLERANCE
            assert (batcher.forwards, batcher.requests) == (5, 6)
        finally:
            batcher.close()


def test_a_frontend_batches_forwards_as_set_and_reports_it(checkpoints):
    with one_worker(checkpoints["olmoe"]) as (model, dispatcher, reference, worker):
        path = Checkpoint(checkpoints["olmoe"])
        with pytest.raises(ValueError, match="forward_batch_tokens is -1"):
            FrontendService(path, dispatcher, forward_batch_tokens=-1)
        for setting, taken in ((None, DEFAULT_FORWARD_BATCH_TOKENS), (64, 64), (0, 0)):
            service = FrontendService(path, dispatcher, **({} if setting is None else {"forward_batch_tokens": setting}))
            try:
                assert service.Info(None, None).forward_batch_tokens == taken
                assert (service.forwards is None) == (taken == 0)
                ids = torch.tensor([[3, 14, 15, 92, 65]])
                reply = service.Forward(frontend_pb2.ForwardRequest(input_ids=encode(ids)), None)
                with torch.no_grad():
                    assert (decode(reply.logits) - reference(input_ids=ids).logits).abs().max().item() <= TOLERANCE
                if service.forwards:
                    assert (service.forwards.forwards, service.forwards.requests) == (1, 1)
            finally:
                service.close()
