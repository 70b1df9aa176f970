"""Affinity-aware placement: the pure regroup, the frontend's pair counts, the controller's pair rates."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moecluster.controller.affinity import LOAD_SLACK, colocated_share, regroup
from moecluster.controller.pair_rates import STALE_S, PairRates
from moecluster.controller.placement import imbalance, moves, place
from moecluster.frontend import coactivation
from moecluster.frontend.coactivation import CoActivation


def planted(layers: int, experts: int, group: int, seed: int = 0, weight: float = 10.0) -> dict:
    """Pairs of every layer's experts in shuffled groups of `group`, each pair picked `weight` tokens/s."""
    rng, pairs = random.Random(seed), {}
    for layer in range(layers):
        perm = list(range(experts))
        rng.shuffle(perm)
        for g in range(0, experts, group):
            members = sorted(perm[g:g + group])
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    pairs[((layer, a), (layer, b))] = weight
    return pairs


def per_worker_counts(placement) -> Counter:
    return Counter(w for hs in placement.values() for w in hs)


def converge(placement, pairs, workers, load=None, plans=50):
    for _ in range(plans):
        after = regroup(placement, pairs, workers=workers, load=load)
        if after == placement:
            return placement
        placement = after
    raise AssertionError(f"regroup still moving after {plans} plans")


def test_experts_picked_together_end_up_on_one_worker_and_nothing_else_changes():
    experts = [(layer, e) for layer in range(2) for e in range(16)]
    workers = {f"w{i}": 8 for i in range(4)}
    pairs = planted(2, 16, 4)
    before = place(experts, workers)
    assert colocated_share(before, pairs) < 0.5
    after = converge(before, pairs, workers)
    assert colocated_share(after, pairs) == 1.0
    assert per_worker_counts(after) == per_worker_counts(before)  # capacity holds
    assert imbalance(after, None, workers) == imbalance(before, None, workers) == 1.0
    assert regroup(after, pairs, workers=workers) == after  # a fixed point: no churn


def test_a_swap_budget_bounds_the_copies_of_one_plan_and_plans_are_deterministic():
    experts = [(0, e) for e in range(16)]
    workers = {f"w{i}": 4 for i in range(4)}
    pairs = planted(1, 16, 4)
    before = place(experts, workers)
    one = regroup(before, pairs, workers=workers, max_swaps=1)
    assert len(moves(before, one)) == 2 and colocated_share(one, pairs) > colocated_share(before, pairs)
    assert regroup(before, pairs, workers=workers) == regroup(before, pairs, workers=workers)
    assert regroup(before, pairs, workers=workers, max_swaps=0) == before


def test_no_swap_without_a_gain_worth_its_copies():
    experts = [(0, e) for e in range(8)]
    workers = {"a": 4, "b": 4}
    before = place(experts, workers)
    uniform = {((0, i), (0, j)): 5.0 for i in range(8) for j in range(i + 1, 8)}  # no structure: any swap gains 0
    assert regroup(before, uniform, workers=workers) == before
    split = {(0, e): ("a",) if e < 4 else ("b",) for e in range(8)}
    kept = {((0, 1), (0, 2)): 1000.0, ((0, 5), (0, 6)): 1000.0}  # already together
    faint = {**kept, ((0, 0), (0, 4)): 1.0}  # apart: co-locating it gains 1/2001 of the layer, below MIN_GAIN
    assert regroup(split, faint, workers=workers) == split
    strong = {**kept, ((0, 0), (0, 4)): 100.0}
    assert colocated_share(regroup(split, strong, workers=workers), strong) == 1.0


def test_co_location_never_overloads_a_worker():
    before = {(0, 0): ("a",), (0, 1): ("a",), (0, 2): ("b",), (0, 3): ("b",)}
    pairs = {((0, 0), (0, 2)): 100.0}  # the two hot experts, picked together
    hot = {(0, 0): 10.0, (0, 2): 10.0, (0, 1): 1.0, (0, 3): 1.0}
    assert regroup(before, pairs, workers=["a", "b"], load=hot) == before  # together they would carry 20 of 22
    swapped = regroup(before, pairs, workers=["a", "b"])  # equal loads: the swap is free
    assert colocated_share(swapped, pairs) == 1.0 and per_worker_counts(swapped) == per_worker_counts(before)


def test_workers_outside_the_pool_and_pairs_that_cannot_share_a_worker_are_left_alone():
    before = {(0, 0): ("a",), (0, 1): ("b",), (0, 2): ("c",), (0, 3): ("c",), (1, 0): ("a",), (1, 1): ("b",)}
    pairs = {((0, 0), (0, 2)): 50.0, ((0, 1), (1, 0)): 50.0, ((0, 0), (9, 9)): 50.0, ((0, 1), (0, 1)): 50.0}
    assert regroup(before, pairs, workers=["a", "b"]) == before  # c is leaving; no pair within a, b gains
    assert colocated_share(before, {}) == 1.0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 6), st.integers(1, 2), st.integers(4, 12), st.integers(1, 2), st.integers(0, 10_000),
       st.booleans())
def test_regroup_keeps_every_invariant(num_workers, layers, experts, replicas, seed, with_load):
    replicas = min(replicas, num_workers)
    rng = random.Random(seed)
    keys = [(layer, e) for layer in range(layers) for e in range(experts)]
    workers = {f"w{i}": -(-len(keys) * replicas // num_workers) + 2 for i in range(num_workers)}
    load = {k: rng.choice([1.0, 1.0, 3.0, 8.0]) for k in keys} if with_load else None
    before = place(keys, workers, load=load, min_replicas=replicas)
    pairs = {(a, b): float(rng.randint(1, 50)) for a in keys for b in keys
             if a < b and a[0] == b[0] and rng.random() < 0.3}
    pool = sorted(workers)[: max(2, num_workers - 1)]  # the last worker may be leaving: untouched
    after = regroup(before, pairs, workers=pool, load=load)
    assert set(after) == set(before)
    for k in keys:
        assert len(after[k]) == len(before[k]) == len(set(after[k]))
        assert [w for w in after[k] if w not in pool] == [w for w in before[k] if w not in pool]
    assert per_worker_counts(after) == per_worker_counts(before)
    assert colocated_share(after, pairs) >= colocated_share(before, pairs) - 1e-12
    for layer in range(layers):
        assert per_worker_counts(in_layer(after, layer)) == per_worker_counts(in_layer(before, layer))
        loads_before, loads_after = worker_loads(before, load, layer), worker_loads(after, load, layer)
        in_pool = [loads_before.get(w, 0.0) for w in pool]
        ceiling = max(max(in_pool), (1 + LOAD_SLACK) * sum(in_pool) / len(pool))
        assert all(loads_after.get(w, 0.0) <= ceiling + 1e-9 for w in pool)
        assert all(loads_after.get(w) == loads_before.get(w) for w in workers if w not in pool)


def in_layer(placement, layer) -> dict:
    return {k: hs for k, hs in placement.items() if k[0] == layer}


def worker_loads(placement, load, layer) -> dict:
    out = {}
    for k, hs in in_layer(placement, layer).items():
        for w in hs:
            out[w] = out.get(w, 0.0) + (1.0 if load is None else load[k]) / len(hs)
    return out


def routed(tokens: int, experts: int, k: int, seed: int, bound: dict | None = None) -> torch.Tensor:
    """(tokens, k) distinct random picks; with `bound` {a: b}, a token that picks a picks b too."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    for a, b in (bound or {}).items():
        rows = (index == a).any(dim=1) & ~(index == b).any(dim=1)
        slot = (index[rows] != a).int().argmax(dim=1)  # a slot not holding a: it becomes b
        index[rows.nonzero().squeeze(1), slot] = b
    return index


def test_the_frontend_reports_pairs_picked_together_beyond_chance_and_nothing_for_random_routing():
    counts = CoActivation()
    counts.record(0, routed(2000, 16, 4, seed=1))  # random: no pair stands out
    counts.record(1, routed(2000, 16, 4, seed=2, bound={3: 9, 5: 6}))
    counts.record(1, torch.tensor([[7]]))  # K = 1: no pairs
    seconds, pairs = counts.take()
    assert seconds >= 0 and 0 not in pairs, pairs.get(0)
    assert sorted((a, b) for a, b, _ in pairs[1]) == [(3, 9), (5, 6)], pairs[1]
    assert all(tokens > 100 for _, _, tokens in pairs[1])  # ~ 2000 x 4/16 picks of 3 or 5, less chance's share
    assert counts.take()[1] == {}  # taken: counting starts anew


def test_a_large_call_is_sampled_and_scaled_and_a_report_keeps_the_heaviest(monkeypatch):
    bound = {0: 1, 2: 3}
    whole = CoActivation()
    whole.record(0, routed(4000, 16, 2, seed=3, bound=bound))
    monkeypatch.setattr(coactivation, "SAMPLE_TOKENS", 2000)
    sampled = CoActivation()
    sampled.record(0, routed(4000, 16, 2, seed=3, bound=bound))
    exact, scaled = dict(((a, b), t) for a, b, t in whole.take()[1][0]), sampled.take()[1][0]
    assert sorted((a, b) for a, b, _ in scaled) == sorted(exact) == [(0, 1), (2, 3)]
    assert all(abs(t / exact[(a, b)] - 1) < 0.25 for a, b, t in scaled)  # half the tokens counted, twice the weight
    monkeypatch.setattr(coactivation, "PAIRS_PER_LAYER", 1)
    sampled.record(0, routed(2000, 16, 2, seed=4, bound=bound))
    assert len(sampled.take()[1][0]) == 1


def test_pair_rates_are_smoothed_summed_over_frontends_and_forgotten_when_stale():
    rates, a, b = PairRates(), ((0, 1), (0, 2)), ((0, 3), (0, 4))
    rates.add("f1", 2.0, {a: 20.0}, now=0.0)  # 10 tokens/s, half weight on the newest
    assert rates.rates(now=0.0) == {a: 5.0}
    rates.add("f1", 2.0, {a: 20.0, b: 4.0}, now=1.0)
    rates.add("f2", 1.0, {a: 2.0}, now=1.0)
    assert rates.rates(now=1.0) == pytest.approx({a: 7.5 + 1.0, b: 1.0})
    rates.add("f2", 0.0, {a: 5.0}, now=2.0)  # an empty window says nothing
    assert rates.rates(now=1.0 + STALE_S + 1) == {}
