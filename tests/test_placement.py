"""controller.placement: validity, hot-expert replication, few moves, errors.

Property tests (hypothesis) check the goals on random inputs; targeted tests pin the corner
cases.  Everything here is pure Python on a few hundred experts: the file runs in seconds.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moecluster.controller.placement import PlacementError, imbalance, layer_imbalance, moves, place

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def zipf_load(layers: int, experts: int, seed: int, s: float = 1.2) -> dict[tuple[int, int], float]:
    """Per layer, load of rank r proportional to 1/r^s, ranks shuffled; each layer sums to 1."""
    rng = random.Random(seed)
    weights = [1 / r**s for r in range(1, experts + 1)]
    out = {}
    for layer in range(layers):
        ranks = rng.sample(range(experts), experts)
        out.update({(layer, e): weights[ranks[e]] / sum(weights) for e in range(experts)})
    return out


def keys_of(layers: int, experts: int) -> list[tuple[int, int]]:
    return [(layer, e) for layer in range(layers) for e in range(experts)]


def assert_valid(plan, keys, capacity, dead=(), min_replicas=1, max_replicas=None):
    """Goal 1: every expert on min..max distinct live workers, no worker over capacity."""
    live = {w for w, c in capacity.items() if c > 0 and w not in set(dead)}
    top = len(live) if max_replicas is None else min(max_replicas, len(live))
    assert set(plan) == set(keys)
    used = dict.fromkeys(live, 0)
    for key, holders in plan.items():
        assert isinstance(holders, tuple)
        assert len(set(holders)) == len(holders), (key, holders)
        assert min_replicas <= len(holders) <= top, (key, holders)
        for w in holders:
            assert w in live, (key, w)
            used[w] += 1
    for w, n in used.items():
        assert n <= capacity[w], (w, n, capacity[w])


def feasible(n, capacity, dead, min_replicas) -> bool:
    """Independent statement of when a placement exists (Gale-Ryser with equal demands)."""
    live = [c for w, c in capacity.items() if c > 0 and w not in dead]
    return n == 0 or (min_replicas <= len(live) and sum(min(c, n) for c in live) >= n * min_replicas)


@st.composite
def requests(draw):
    keys = keys_of(draw(st.integers(1, 3)), draw(st.integers(1, 12)))
    ids = [f"w{j}" for j in range(draw(st.integers(1, 8)))]
    capacity = {w: draw(st.integers(0, 12)) for w in ids}
    dead = set(draw(st.lists(st.sampled_from(ids + ["ghost"]), max_size=3)))
    min_r = draw(st.integers(1, 3))
    max_r = draw(st.one_of(st.none(), st.integers(min_r, min_r + 3)))
    load = draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(keys), st.floats(0, 100), max_size=len(keys))))
    current = draw(st.one_of(st.none(), st.dictionaries(
        st.sampled_from(keys), st.lists(st.sampled_from(ids + ["ghost"]), max_size=4), max_size=len(keys))))
    return dict(experts=keys, capacity=capacity, load=load, current=current, dead=dead,
                min_replicas=min_r, max_replicas=max_r)


@SETTINGS
@given(requests())
def test_plans_are_valid_deterministic_and_stable(req):
    if not feasible(len(req["experts"]), req["capacity"], req["dead"], req["min_replicas"]):
        with pytest.raises(PlacementError):
            place(**req)
        return
    plan = place(**req)
    assert_valid(plan, req["experts"], req["capacity"], req["dead"], req["min_replicas"], req["max_replicas"])
    assert place(**req) == plan  # deterministic
    assert place(**{**req, "current": plan}) == plan  # nothing changed: nothing moves


@SETTINGS
@given(st.integers(1, 24), st.lists(st.integers(1, 24), min_size=2, max_size=6), st.integers(1, 3), st.randoms())
def test_tight_capacity_still_places_everything(n, caps, min_r, rnd):
    """Exactly as many slots as replicas, uneven workers: greedy alone can corner itself."""
    keys = keys_of(1, n)
    capacity = {f"w{j}": c for j, c in enumerate(caps)}
    slots = sum(min(c, n) for c in caps)
    if min_r > len(caps) or slots < n * min_r:
        return
    # Trim the biggest workers until the slots are exactly the need (still feasible: Gale-Ryser).
    for w in sorted(capacity, key=capacity.get, reverse=True):
        cut = min(max(0, min(capacity[w], n) - 1), slots - n * min_r)
        capacity[w] = min(capacity[w], n) - cut
        slots -= cut
    load = {k: rnd.random() for k in keys}
    plan = place(keys, capacity, load=load, min_replicas=min_r)
    assert_valid(plan, keys, capacity, min_replicas=min_r)


@SETTINGS
@given(st.integers(8, 16), st.integers(1, 2), st.integers(0, 10**6))
def test_zipf_load_is_balanced_by_replicating_hot_experts(workers, min_r, seed):
    keys, load = keys_of(4, 64), zipf_load(4, 64, seed)
    ids = [f"w{j}" for j in range(workers)]
    capacity = dict.fromkeys(ids, math.ceil(1.5 * len(keys) * min_r / workers))
    plan = place(keys, capacity, load=load, min_replicas=min_r)
    assert_valid(plan, keys, capacity, min_replicas=min_r)
    assert imbalance(plan, load, ids) <= 1.15
    assert len(plan[max(keys, key=load.get)]) > min_r


def test_replicas_are_what_balances_zipf_load():
    keys, load = keys_of(4, 64), zipf_load(4, 64, seed=7)
    capacity = dict.fromkeys([f"w{j}" for j in range(32)], 12)
    flat = place(keys, capacity, load=load, max_replicas=1)
    plan = place(keys, capacity, load=load)
    # The hottest expert alone carries more than twice a worker's mean load.
    assert imbalance(flat, load, capacity) > 2.0
    assert imbalance(plan, load, capacity) <= 1.15


@SETTINGS
@given(st.integers(4, 16), st.integers(1, 2), st.booleans(), st.integers(0, 10**6))
def test_adding_a_worker_moves_about_its_share(workers, min_r, zipf, seed):
    keys = keys_of(4, 64)
    load = zipf_load(4, 64, seed) if zipf else None
    ids = [f"w{j}" for j in range(workers)]
    slots = math.ceil(1.5 * len(keys) * min_r / workers)
    before = place(keys, dict.fromkeys(ids, slots), load=load, min_replicas=min_r)
    capacity = dict.fromkeys(ids + ["new"], slots)
    after = place(keys, capacity, load=load, current=before, min_replicas=min_r)
    assert_valid(after, keys, capacity, min_replicas=min_r)
    total_before, total_after = sum(map(len, before.values())), sum(map(len, after.values()))
    if not zipf:
        assert total_after == total_before == len(keys) * min_r  # uniform load: no extra replicas
    share = math.ceil(total_before / (workers + 1))
    # Its share, and a few more to even out each layer.
    assert len(moves(before, after)) <= share * 3 // 2 + abs(total_after - total_before) + 2
    assert any("new" in hs for hs in after.values())  # the new worker takes load
    # Within the layer band, unless a layer's experts do not divide evenly (then as even as a fresh plan).
    fresh = place(keys, capacity, load=load, min_replicas=min_r)
    assert imbalance(after, load, capacity) <= max(1.15, imbalance(fresh, load, capacity))


@SETTINGS
@given(st.integers(4, 16), st.integers(1, 2), st.booleans(), st.integers(0, 10**6))
def test_losing_a_worker_moves_only_its_replicas(workers, min_r, scale_down, seed):
    keys, load = keys_of(4, 64), zipf_load(4, 64, seed)
    ids = [f"w{j}" for j in range(workers)]
    capacity = dict.fromkeys(ids, math.ceil(1.5 * len(keys) * min_r / workers))
    before = place(keys, capacity, load=load, min_replicas=min_r)
    victim = random.Random(seed).choice(ids)
    if scale_down:  # removed by the operator: gone from capacity too
        capacity = {w: c for w, c in capacity.items() if w != victim}
    after = place(keys, capacity, load=load, current=before, dead={victim}, min_replicas=min_r)
    assert_valid(after, keys, capacity, dead={victim}, min_replicas=min_r)
    held = sum(victim in hs for hs in before.values())
    copies = len(moves(before, after))
    assert copies <= held + max(4, held // 4)  # its replicas, and a few more to even out each layer
    # Replicas others lose: those few, and extras the smaller pool has no room for (free: nothing copied).
    disturbed = sum(w != victim and w not in after[k] for k, hs in before.items() for w in hs)
    assert disturbed <= held
    live = [w for w in ids if w != victim]
    assert imbalance(after, load, live) <= 1.16


@SETTINGS
@given(st.integers(8, 16), st.integers(1, 2), st.integers(0, 10**6))
def test_load_noise_moves_almost_nothing(workers, min_r, seed):
    keys, load = keys_of(4, 64), zipf_load(4, 64, seed)
    capacity = dict.fromkeys([f"w{j}" for j in range(workers)], math.ceil(1.5 * len(keys) * min_r / workers))
    before = place(keys, capacity, load=load, min_replicas=min_r)
    rng = random.Random(seed)
    noisy = {k: x * rng.uniform(0.9, 1.1) for k, x in load.items()}  # +-10% measurement noise
    after = place(keys, capacity, load=noisy, current=before, min_replicas=min_r)
    assert len(moves(before, after)) <= 0.03 * sum(map(len, before.values()))
    assert imbalance(after, noisy, capacity) <= 1.1


def test_moves_counts_new_copies_only():
    before = {(0, 0): ("a", "b"), (0, 1): ("c",)}
    after = {(0, 0): ("b", "d"), (0, 1): ("c",), (0, 2): ("a",)}
    assert moves(before, after) == [((0, 0), "d"), ((0, 2), "a")]
    assert moves(after, after) == []


def test_imbalance_splits_load_and_counts_idle_workers():
    plan = {(0, 0): ("a", "b"), (0, 1): ("a",)}
    load = {(0, 0): 2.0, (0, 1): 1.0}
    assert imbalance(plan, load, ["a", "b"]) == pytest.approx(2.0 / 1.5)
    assert imbalance(plan, load, ["a", "b", "c"]) == pytest.approx(2.0 / 1.0)
    assert imbalance({(0, 0): ("a",), (0, 1): ("b",)}, None, ["a", "b"]) == 1.0


def test_imbalance_is_what_each_layer_waits_for():
    # Each worker carries half of all the load, but each layer waits for one worker doing all of it.
    by_layer = {(0, 0): ("a",), (0, 1): ("a",), (1, 0): ("b",), (1, 1): ("b",)}
    assert imbalance(by_layer, None, "ab") == pytest.approx(2.0)
    spread = {(0, 0): ("a",), (0, 1): ("b",), (1, 0): ("a",), (1, 1): ("b",)}
    assert imbalance(spread, None, "ab") == 1.0
    # Layers weigh by their load: a busy layer's wait counts more.
    load = {(0, 0): 3.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 1.0}
    assert imbalance(spread, load, "ab") == pytest.approx((3.0 + 1.0) / (2.0 + 1.0))
    # Which layer waits: layer 0's busiest worker does 3 of its 4.  A layer with no load is left out.
    assert layer_imbalance(spread, load, "ab") == pytest.approx({0: 1.5, 1: 1.0})
    assert layer_imbalance(spread, {**load, (1, 0): 0.0, (1, 1): 0.0}, "abc") == pytest.approx({0: 2.25})


def test_every_layer_is_spread_over_the_workers():
    # The same Zipf ranks in every layer: balancing only each worker's total put each layer on one
    # worker (each layer waited for a worker doing all of its work: imbalance 8.0 here).
    keys, ids = keys_of(16, 64), [f"w{j}" for j in range(8)]
    weights = [1 / r**1.2 for r in range(1, 65)]
    load = {(layer, e): weights[e] for layer, e in keys}
    for min_r in (1, 2):
        plan = place(keys, dict.fromkeys(ids, 64 * 16 * min_r * 3 // 2 // 8), load=load, min_replicas=min_r)
        assert imbalance(plan, load, ids) <= 1.1
        assert all(any(w in plan[(layer, e)] for e in range(64)) for layer in range(16) for w in ids)


def test_a_layer_with_fewer_experts_than_workers_is_copied_onto_all_of_them_if_there_is_room():
    keys, ids = keys_of(2, 4), [f"w{j}" for j in range(8)]
    roomy = place(keys, dict.fromkeys(ids, 3), load=dict.fromkeys(keys, 1.0))  # a slot each is kept free
    assert all(len(hs) == 2 for hs in roomy.values())  # every worker holds one expert of each layer
    assert imbalance(roomy, None, ids) == 1.0
    tight = place(keys, dict.fromkeys(ids, 1), load=dict.fromkeys(keys, 1.0))
    assert all(len(hs) == 1 for hs in tight.values())
    assert imbalance(tight, None, ids) == pytest.approx(2.0)  # half of the workers wait in each layer


def test_hot_expert_is_replicated_up_to_max_replicas():
    keys = keys_of(1, 8)
    load = {k: 1.0 for k in keys} | {(0, 3): 100.0}
    capacity = dict.fromkeys("abcdef", 4)
    plan = place(keys, capacity, load=load)
    assert len(plan[(0, 3)]) == 6  # one copy on every worker
    assert sum(map(len, plan.values())) > len(keys)
    capped = place(keys, capacity, load=load, max_replicas=3)
    assert len(capped[(0, 3)]) == 3
    assert imbalance(plan, load, capacity) < imbalance(capped, load, capacity)


def test_uniform_load_gets_no_extra_replicas():
    keys = keys_of(2, 32)
    plan = place(keys, dict.fromkeys("abcd", 40), min_replicas=2)
    assert all(len(hs) == 2 for hs in plan.values())
    assert imbalance(plan, None, "abcd") == 1.0


def test_a_cooled_expert_drops_replicas_without_copying_it():
    keys = keys_of(1, 64)
    capacity = dict.fromkeys("abcdefgh", 32)
    hot = {k: 1.0 for k in keys} | {(0, 3): 40.0}
    before = place(keys, capacity, load=hot, min_replicas=2, max_replicas=5)
    assert len(before[(0, 3)]) == 5
    after = place(keys, capacity, current=before, min_replicas=2, max_replicas=5)  # uniform again
    assert len(after[(0, 3)]) == 2 and set(after[(0, 3)]) <= set(before[(0, 3)])
    copies = moves(before, after)
    assert all(key != (0, 3) for key, _ in copies)
    # The workers that carried the hot expert are now idle: others' replicas move to them.
    assert 0 < len(copies) <= 64 * 2 // 8 * 3
    assert imbalance(after, None, capacity) <= 1.05 + 1 / 16


def test_counts_that_cannot_all_fit_give_up_an_extra_not_a_required_replica():
    # Two hot experts want all 3 workers, but worker c has one slot: only one of them can.
    keys = keys_of(1, 6)
    load = {(0, 0): 100.0, (0, 1): 100.0} | {(0, e): 1.0 for e in range(2, 6)}
    capacity = {"a": 6, "b": 6, "c": 1}
    current = {(0, 0): ("a", "b", "c"), (0, 1): ("a", "b", "c")}
    plan = place(keys, capacity, load=load, current=current)
    assert_valid(plan, keys, capacity)
    assert len(plan[(0, 0)]) + len(plan[(0, 1)]) == 5
    copies = moves(current, plan)
    assert sorted(key for key, _ in copies) == keys[2:] and {w for _, w in copies} <= {"a", "b"}


def test_dead_and_unknown_workers_in_current_are_replaced():
    keys = keys_of(1, 4)
    current = {(0, 0): ("a", "zombie"), (0, 1): ("dead",), (0, 2): ("b",), (0, 3): ("a", "a")}
    plan = place(keys, {"a": 3, "b": 3, "dead": 3}, current=current, dead={"dead"})
    assert_valid(plan, keys, {"a": 3, "b": 3}, min_replicas=1)
    assert "a" in plan[(0, 0)] and "b" in plan[(0, 2)] and "a" in plan[(0, 3)]


def test_shrunk_capacity_sheds_replicas():
    keys = keys_of(1, 6)
    before = {k: ("a",) for k in keys}
    plan = place(keys, {"a": 2, "b": 4}, current=before)
    assert_valid(plan, keys, {"a": 2, "b": 4})
    assert sum("a" in hs for hs in plan.values()) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(capacity={"a": 4}, min_replicas=2), "distinct live workers"),
    (dict(capacity={"a": 4, "b": 4}, dead={"a"}, min_replicas=2), "distinct live workers"),
    (dict(capacity={"a": 1, "b": 2}), "slots"),
    (dict(capacity={"a": 10, "b": 10}, min_replicas=2), "slots"),  # one copy per worker per expert
    (dict(capacity={}), "no live worker"),
    (dict(capacity={"a": 0}), "no live worker"),
    (dict(capacity={"a": 4}, min_replicas=0), "min_replicas"),
    (dict(capacity={"a": 4, "b": 4}, min_replicas=2, max_replicas=1), "max_replicas"),
    (dict(capacity={"a": -1}), "capacity"),
    (dict(capacity={"a": 4}, load={(0, 0): -1.0}), "load"),
    (dict(capacity={"a": 4}, load={(0, 0): float("nan")}), "load"),
])
def test_impossible_requests_raise_actionable_errors(kwargs, message):
    experts = keys_of(1, 4) if kwargs["capacity"] != {"a": 10, "b": 10} else keys_of(1, 11)
    with pytest.raises(PlacementError, match=message):
        place(experts, **kwargs)


def test_duplicate_experts_are_rejected():
    with pytest.raises(PlacementError, match="twice"):
        place([(0, 0), (0, 0)], {"a": 4})


def test_placement_error_is_a_value_error_and_empty_input_is_fine():
    assert issubclass(PlacementError, ValueError)
    assert place([], {"a": 1}) == {}


@SETTINGS
@given(st.integers(1, 6), st.integers(2, 12), st.integers(1, 24), st.integers(1, 3))
def test_evenly_loaded_layers_are_spread_within_one_expert_per_worker(layers, workers, per_worker, min_r):
    min_r = min(min_r, workers)
    keys, ids = keys_of(layers, workers * per_worker // min_r + 1), [f"w{j}" for j in range(workers)]
    plan = place(keys, dict.fromkeys(ids, math.ceil(1.5 * len(keys) * min_r / workers)), min_replicas=min_r)
    for layer in range(layers):
        counts = [sum(w in hs for (l, _), hs in plan.items() if l == layer) for w in ids]
        assert max(counts) - min(counts) <= 1, (layer, counts)
