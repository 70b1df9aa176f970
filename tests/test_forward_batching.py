"""Inference forwards that arrive together are computed together: the batcher's hand-offs
(threads, no timing), one kernel call for several requests against the per-request answer,
and a real worker answering concurrent requests."""

from __future__ import annotations

import random
import threading

import grpc
import pytest
import torch
from moecluster.wire.tensors import decode
from moecluster.workers.batched_forward import forward_together
from moecluster.workers.expert_store import ExpertStore
from moecluster.workers.kernels import reference_experts
from moecluster.workers.request_batcher import RequestBatcher
from moecluster.workers.request_error import RequestError
from moecluster.workers.validation import ForwardInputs
from shared import running_workers, wait_for
from worker_helpers import TIMEOUT_S, expected, max_err, request, routing, stats, stub_for

JOIN_S = 30.0


class Recorder:
    """A compute that records its calls; a call whose first item is in `hold` waits for `release`."""

    def __init__(self, hold=()):
        self.calls: list[tuple[str, list]] = []
        self.hold = set(hold)
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, key, items):
        self.calls.append((key, list(items)))
        if items[0] in self.hold:
            self.started.set()
            assert self.release.wait(JOIN_S)
        return [item * 10 for item in items]


def in_threads(batcher, keyed_items, rows=None):
    """Runs each (key, item) in its own thread, in order, each queued before the next starts;
    returns (threads, answers by item)."""
    answers, threads = {}, []
    for key, item in keyed_items:
        before = batcher.queued()
        thread = threading.Thread(target=lambda k=key, i=item: answers.__setitem__(i, batcher.run(k, i, (rows or {}).get(i, 1))))
        thread.start()
        threads.append(thread)
        assert wait_for(lambda: batcher.queued() == before + 1, JOIN_S)
    return threads, answers


def holding(max_rows, key="layer", first=1, threads=1):
    """A batcher whose call for `first` (on `key`) has started and waits for `compute.release`;
    returns (compute, batcher, that call's thread)."""
    compute = Recorder(hold={first})
    batcher = RequestBatcher(compute, max_rows=max_rows, threads=threads)
    thread = threading.Thread(target=lambda: batcher.run(key, first, 1))
    thread.start()
    assert compute.started.wait(JOIN_S)
    return compute, batcher, thread


def joined(threads):
    for thread in threads:
        thread.join(JOIN_S)
    return not any(t.is_alive() for t in threads)


def test_a_request_alone_is_computed_at_once_and_alone():
    compute = Recorder()
    batcher = RequestBatcher(compute, max_rows=64)
    assert batcher.run("layer", 3, rows=5) == 30
    assert batcher.run("layer", 4, rows=5) == 40
    assert compute.calls == [("layer", [3]), ("layer", [4])]
    assert (batcher.calls, batcher.requests, batcher.queued()) == (2, 2, 0)


def test_requests_that_arrive_during_a_call_go_together_in_the_next_in_arrival_order():
    compute, batcher, first = holding(max_rows=64)
    threads, answers = in_threads(batcher, [("layer", i) for i in (2, 3, 4, 5)])
    compute.release.set()
    assert joined([first, *threads])
    assert compute.calls == [("layer", [1]), ("layer", [2, 3, 4, 5])]
    assert answers == {2: 20, 3: 30, 4: 40, 5: 50}
    assert (batcher.calls, batcher.requests, batcher.queued()) == (2, 5, 0)


def test_a_call_takes_up_to_max_rows_and_a_larger_request_does_not_queue():
    compute, batcher, first = holding(max_rows=6, first=0)
    rows = {1: 3, 2: 3, 3: 3, 4: 6, 5: 2}
    threads, answers = in_threads(batcher, [("layer", i) for i in (1, 2, 3, 4, 5)], rows)
    assert batcher.run("layer", 9, rows=7) == 90  # over max_rows: computed now, while the layer's call still runs
    compute.release.set()
    assert joined([first, *threads])
    assert [items for _, items in compute.calls] == [[0], [9], [1, 2], [3], [4], [5]]
    assert answers == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    assert (batcher.calls, batcher.requests) == (6, 7)


def test_the_next_call_is_for_the_oldest_request_and_takes_its_layer_only():
    compute, batcher, first = holding(max_rows=64, key="layer 0")
    threads, answers = in_threads(batcher, [("layer 1", 2), ("layer 0", 3), ("layer 1", 4), ("layer 0", 5)])
    compute.release.set()
    assert joined([first, *threads])
    assert compute.calls == [("layer 0", [1]), ("layer 1", [2, 4]), ("layer 0", [3, 5])]
    assert answers == {2: 20, 3: 30, 4: 40, 5: 50}


def test_a_second_compute_thread_computes_while_the_first_is_busy():
    compute, batcher, first = holding(max_rows=64, threads=2)
    assert batcher.run("layer", 2, 1) == 20  # while the call for 1 still runs
    compute.release.set()
    assert joined([first])
    assert compute.calls == [("layer", [1]), ("layer", [2])]


@pytest.mark.parametrize("threads", [1, 2])
def test_every_call_is_made_on_the_batchers_own_threads(threads):
    callers = set()

    def compute(key, items):
        callers.add(threading.get_ident())
        return items

    batcher = RequestBatcher(compute, max_rows=4, threads=threads)
    clients = [threading.Thread(target=lambda n=n: batcher.run(n % 2, n, 1)) for n in range(16)]
    for thread in clients:
        thread.start()
    assert joined(clients)
    assert 1 <= len(callers) <= threads and not callers & {threading.get_ident(), *(t.ident for t in clients)}
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.run(0, 1, 1)


def test_a_refused_request_fails_alone_and_a_failed_call_fails_its_requests_only():
    failing = {"call": False}

    def compute(key, items):
        if failing["call"]:
            failing["call"] = False
            raise RuntimeError("kernel fell over")
        return [ValueError(f"bad {i}") if i < 0 else i for i in items]

    batcher = RequestBatcher(compute, max_rows=64)
    with pytest.raises(ValueError, match="bad -1"):
        batcher.run("layer", -1, 1)
    failing["call"] = True
    with pytest.raises(RuntimeError, match="kernel fell over"):
        batcher.run("layer", 7, 1)
    assert batcher.run("layer", 8, 1) == 8  # the lead was handed on: the layer is not stuck


def test_a_compute_that_answers_too_few_fails_each_request_and_the_next_call_runs():
    batcher = RequestBatcher(lambda key, items: [], max_rows=4)
    with pytest.raises(RuntimeError, match="answered 0 of 1"):
        batcher.run("layer", 1, 1)
    assert batcher.queued() == 0


def test_many_threads_each_get_their_own_answer():
    seen = []

    def compute(key, items):
        seen.append(len(items))
        return [(key, item) for item in items]

    batcher = RequestBatcher(compute, max_rows=8)
    answers: dict[tuple[int, int], object] = {}
    rng = random.Random(0)

    def client(n):
        for i in range(40):
            key = rng.randrange(3)
            answers[(n, i)] = (batcher.run(key, (n, i), rows=rng.randint(1, 5)), key)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    assert joined(threads)
    assert len(answers) == 480
    assert all(answer == (key, ident) for ident, (answer, key) in answers.items())
    assert sum(seen) == batcher.requests == 480 and batcher.calls == len(seen)
    assert batcher.queued() == 0


def test_max_rows_or_threads_below_one_are_refused():
    with pytest.raises(ValueError, match="at least 1 row"):
        RequestBatcher(lambda key, items: items, max_rows=0)
    with pytest.raises(ValueError, match="at least 1 thread"):
        RequestBatcher(lambda key, items: items, max_rows=1, threads=0)


# -- one kernel call for several requests --------------------------------------------------------


def test_requests_computed_together_equal_each_computed_alone():
    torch.manual_seed(0)
    store = ExpertStore(num_experts=8, dtype=torch.float32, device="cpu")
    weights = {(0, e): (torch.randn(2 * 24, 64) / 8, torch.randn(64, 24) / 8) for e in (0, 2, 3, 5, 7)}
    store.add(weights)
    gate_up = torch.zeros(8, 48, 64)
    down = torch.zeros(8, 64, 24)
    for (_, e), (g, d) in weights.items():
        gate_up[e], down[e] = g, d

    def inputs(tokens, experts, k, seed, dtype=torch.float32):
        hidden, index, top_w = routing(tokens, experts, k=k, seed=seed, dtype=dtype)
        return ForwardInputs(0, hidden, index, top_w)

    requests = [
        inputs(5, [0, 2, 3], 2, 1),
        inputs(3, [0, 1], 2, 2),  # expert 1 is not held: this one alone is refused
        inputs(1, [5, 7, 0, 3], 4, 3),  # a wider top-k than the others
        ForwardInputs(0, torch.randn(2, 64), torch.full((2, 2), -1), torch.rand(2, 2)),  # nothing here
        inputs(0, [2, 3], 2, 4),
        inputs(7, [2, 3, 5, 7], 2, 5, dtype=torch.bfloat16),
    ]
    with store.reading(0) as snapshot:
        outcomes = forward_together(snapshot, requests, epoch=4, device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(outcomes[1], RequestError) and outcomes[1].code == grpc.StatusCode.FAILED_PRECONDITION
    assert "experts [1] of layer 0" in outcomes[1].message and "epoch 4" in outcomes[1].message
    for i in (0, 2, 3, 4, 5):
        r = requests[i]
        want = reference_experts(r.hidden_states.float(), gate_up, down, r.top_k_index.long(), r.top_k_weights.float())
        assert outcomes[i].shape == r.hidden_states.shape and outcomes[i].dtype == r.hidden_states.dtype
        tolerance = 2e-2 if r.hidden_states.dtype == torch.bfloat16 else 1e-5
        assert max_err(outcomes[i], want) <= tolerance, i


# -- a real worker -------------------------------------------------------------------------------


def test_a_worker_computes_concurrent_forwards_together_and_answers_each_its_own(qwen3, weights):
    placement = {(layer, e): ("w",) for layer in (0, 1) for e in range(8)}
    with running_workers(qwen3, placement) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            failures, answers = [], {}
            barrier = threading.Barrier(8)

            def client(n):
                try:
                    for i in range(6):
                        layer = i % 2
                        hidden, index, top_w = routing(1 + (n * 7 + i) % 9, list(range(8)), k=2, seed=100 * n + i)
                        barrier.wait(JOIN_S)  # all eight at once, so that some arrive during another's call
                        reply = stub.Forward(request(layer, hidden, index, top_w), timeout=TIMEOUT_S)
                        answers[(n, i)] = max_err(decode(reply.output), expected(weights, layer, hidden, index, top_w))
                except Exception as err:  # noqa: BLE001 - reported below
                    failures.append(repr(err))

            threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            assert joined(threads) and not failures
            assert len(answers) == 48 and max(answers.values()) <= 1e-5
            now = stats(stub)
            assert now.requests == now.batched_requests == 48
            assert now.forward_batches < 48, "eight requests at once never shared a call"


def test_a_worker_with_batching_off_computes_each_request_alone(qwen3):
    from moecluster.models.checkpoint import Checkpoint
    from moecluster.workers.server import WorkerServer
    from moecluster.workers.service import ExpertWorkerService

    server = WorkerServer(qwen3, [(0, e) for e in range(8)], worker_id="w", batch_tokens=0).start()
    try:
        channel, stub = stub_for(server)
        with channel:
            hidden, index, top_w = routing(4, list(range(8)))
            stub.Forward(request(0, hidden, index, top_w), timeout=TIMEOUT_S)
            now = stats(stub)
            assert (now.requests, now.forward_batches, now.batched_requests) == (1, 0, 0)
    finally:
        server.stop(0)
    with pytest.raises(ValueError, match="batch_tokens is -1"):
        ExpertWorkerService(Checkpoint(qwen3), worker_id="w", batch_tokens=-1)
