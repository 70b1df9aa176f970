"""Dispatch: one RPC per worker per layer, replicas by load, failover without failed requests."""

import pytest
import torch
from moecluster.controller.static_placement import static_placement
from moecluster.frontend.dispatcher import Dispatcher, DispatchError, ExpertUnavailableError
from moecluster.frontend.routing import RoutingTable
from moecluster.models.checkpoint import Checkpoint
from moecluster.protos import worker_pb2
from moecluster.workers.kernels import reference_experts
from shared import running_workers


def stacked(index: Checkpoint, layer: int):
    pairs = [index.read_expert(layer, e) for e in range(index.geometry.num_experts)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def routed_batch(index: Checkpoint, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, index.geometry.hidden, generator=g)
    logits = torch.randn(tokens, index.geometry.num_experts, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(index.geometry.top_k, dim=-1)
    return hidden, ids, weights


def stats(server):
    return server.service.Stats(worker_pb2.StatsRequest(), None)


@pytest.fixture
def setup(qwen3):
    index = Checkpoint(qwen3)
    g = index.geometry
    placement = static_placement(g.moe_layers, g.num_experts, ["w0", "w1", "w2"], replicas=2)
    with running_workers(qwen3, placement) as servers:
        table = RoutingTable(1, {w: s.address for w, s in servers.items()}, placement)
        dispatcher = Dispatcher(table, timeout=10)
        yield index, placement, servers, dispatcher
        dispatcher.close()


def test_one_rpc_per_worker_per_layer_and_every_pair_served_once(setup):
    index, _, servers, dispatcher = setup
    hidden, ids, weights = routed_batch(index, 64)
    out = dispatcher.forward(1, hidden, ids, weights)
    assert torch.allclose(out, reference_experts(hidden, *stacked(index, 1), ids, weights), atol=1e-5)
    requests = {w: stats(s).requests for w, s in servers.items()}
    assert all(n <= 1 for n in requests.values()) and sum(requests.values()) >= 2, requests
    pairs = sum(e.tokens for s in servers.values() for e in stats(s).experts)
    assert pairs == ids.numel()


def test_replicas_share_the_load(setup):
    index, _, servers, dispatcher = setup
    for seed in range(12):
        dispatcher.forward(0, *routed_batch(index, 16, seed))
    per_worker = {w: stats(s).requests for w, s in servers.items()}
    assert all(n > 0 for n in per_worker.values()), per_worker


def test_experts_a_token_picked_that_share_a_worker_are_sent_there_together(setup):
    """Experts 0 and 1 of layer 0 share w1 (w0 and w2 hold one each): every token goes to w1 alone."""
    index, placement, servers, dispatcher = setup
    assert set(placement[(0, 0)]) & set(placement[(0, 1)]) == {"w1"}
    hidden, _, weights = routed_batch(index, 32, seed=5)
    ids = torch.tensor([[0, 1]] * 32)
    out = dispatcher.forward(0, hidden, ids, weights)
    assert torch.allclose(out, reference_experts(hidden, *stacked(index, 0), ids, weights), atol=1e-5)
    assert {w: stats(s).requests for w, s in servers.items()} == {"w0": 0, "w1": 1, "w2": 0}
    assert (dispatcher.tokens_in, dispatcher.tokens_sent) == (32, 32)  # one worker per token


def test_one_call_spreads_its_tokens_over_the_replicas(setup):
    index, _, servers, dispatcher = setup
    dispatcher.forward(0, *routed_batch(index, 96, seed=6))
    pairs = [sum(e.tokens for e in stats(s).experts) for s in servers.values()]
    assert max(pairs) * len(pairs) / sum(pairs) < 1.5, pairs


def test_dead_replica_is_routed_around(setup):
    index, _, servers, dispatcher = setup
    hidden, ids, weights = routed_batch(index, 48, seed=3)
    expected = reference_experts(hidden, *stacked(index, 0), ids, weights)
    servers["w1"].stop(0)
    for _ in range(3):
        out = dispatcher.forward(0, hidden, ids, weights)
        assert torch.allclose(out, expected, atol=1e-5)
    assert dispatcher.retries >= 1


def test_stale_table_is_retried_on_another_replica(setup):
    index, placement, servers, dispatcher = setup
    dispatcher.stale_wait = 0.1
    first_holder = placement[(0, 0)][0]
    servers[first_holder].service.store.drop([(0, e) for e in range(8)])
    hidden, ids, weights = routed_batch(index, 32, seed=5)
    out = dispatcher.forward(0, hidden, ids, weights)
    assert torch.allclose(out, reference_experts(hidden, *stacked(index, 0), ids, weights), atol=1e-5)
    assert dispatcher.retries >= 1, "FAILED_PRECONDITION is retried on the other replica"


def test_a_trainers_forward_goes_around_a_replica_that_missed_an_update(setup):
    """Layer 1 trained once (version 1) on w0 and w1; w2 missed that update and holds other weights: a forward
    for step 2 must never be answered by w2, an inference forward (step 0) may be."""
    index, placement, servers, dispatcher = setup
    for worker_id, server in servers.items():
        store = server.service.store
        for layer, e in [k for k, holders in placement.items() if k[0] == 1 and worker_id in holders]:
            gate_up, down = store.get(layer, e)
            store.replace(layer, e, gate_up * (2 if worker_id == "w2" else 1), down, version=int(worker_id != "w2"))
    batches = [routed_batch(index, 16, seed) for seed in range(8)]
    inference = [dispatcher.forward(1, *batch) for batch in batches]
    assert any(not torch.allclose(out, reference_experts(h, *stacked(index, 1), i, w), atol=1e-5)
               for out, (h, i, w) in zip(inference, batches)), "step 0 reads any replica (w2 among them)"
    for hidden, ids, weights in batches:
        out = dispatcher.forward(1, hidden, ids, weights, step=2)
        assert torch.allclose(out, reference_experts(hidden, *stacked(index, 1), ids, weights), atol=1e-5)
    assert dispatcher.retries >= 1, "w2 refused (ABORTED) and its share went to the other replica"


def test_no_live_replica_is_a_clear_error(setup):
    index, placement, servers, dispatcher = setup
    for worker_id in placement[(1, 4)]:
        servers[worker_id].stop(0)
    hidden = torch.randn(2, index.geometry.hidden)
    ids = torch.tensor([[4], [4]])
    with pytest.raises(ExpertUnavailableError, match="expert 4 of layer 1 has no live replica"):
        dispatcher.forward(1, hidden, ids, torch.ones(2, 1))


def test_a_departed_workers_channel_is_closed_and_a_call_racing_the_close_fails_over(setup):
    index, placement, servers, dispatcher = setup
    hidden, ids, weights = routed_batch(index, 48, seed=7)
    expected = reference_experts(hidden, *stacked(index, 0), ids, weights)
    dispatcher.forward(0, hidden, ids, weights)
    dispatcher._channels[servers["w0"].address].close()  # as if w0 left while this request held its stub
    out = dispatcher.forward(0, hidden, ids, weights)
    assert torch.allclose(out, expected, atol=1e-5)
    assert dispatcher.retries >= 1
    departed = dispatcher.stub("w2")
    smaller = {k: tuple(w for w in holders if w != "w2") for k, holders in placement.items()}
    dispatcher.update(RoutingTable(2, {w: servers[w].address for w in ("w0", "w1")}, smaller))
    assert set(dispatcher._channels) == {servers["w0"].address, servers["w1"].address}
    with pytest.raises(ValueError, match="closed channel"):
        departed.Stats(worker_pb2.StatsRequest(), timeout=5)


def test_routing_table_rejects_unknown_workers():
    with pytest.raises(ValueError, match="unknown workers"):
        RoutingTable(1, {"a": "127.0.0.1:1"}, {(0, 0): ("a", "b")})


def test_table_updates_only_move_forward(setup):
    _, placement, _, dispatcher = setup
    newer = RoutingTable(5, dispatcher.table.workers, placement)
    dispatcher.update(newer)
    dispatcher.update(RoutingTable(3, dispatcher.table.workers, placement))
    assert dispatcher.table.epoch == 5


def test_routing_table_json_round_trip(setup):
    table = setup[3].table
    assert RoutingTable.from_json(table.to_json()) == table


def test_malformed_request_from_a_buggy_frontend_is_not_retried(setup):
    index, _, _, dispatcher = setup
    with pytest.raises(DispatchError, match="refused layer 0: INVALID_ARGUMENT"):
        dispatcher.forward(0, torch.full((1, index.geometry.hidden), float("nan")), torch.tensor([[0, 1]]),
                           torch.tensor([[0.5, 0.5]]))
