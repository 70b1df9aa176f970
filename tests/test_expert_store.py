"""The worker's expert store: slots, snapshots, and slot reuse that never reaches a reader."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moecluster.workers.expert_store import ExpertStore

H, I, E = 6, 4, 8


def weights(layer: int, expert: int):
    """Distinct, recognisable weights for (layer, expert)."""
    base = 100 * layer + expert
    return torch.full((2 * I, H), float(base)), torch.full((H, I), float(-base))


def check_snapshot(store: ExpertStore, layer: int, expected: set[int]):
    snap = store.snapshot(layer)
    if not expected:
        assert snap is None
        return
    assert set(snap.experts) == expected
    index = torch.tensor([[e] for e in range(E)] + [[-1]])
    local = snap.local_index(index).flatten().tolist()
    for e in range(E):
        if e in expected:
            g, d = weights(layer, e)
            assert torch.equal(snap.gate_up[local[e]], g) and torch.equal(snap.down[local[e]], d)
        else:
            assert local[e] == -1
    assert local[E] == -1


def test_add_get_drop_and_versions():
    store = ExpertStore(E)
    assert store.add({(0, 1): weights(0, 1), (0, 5): weights(0, 5), (1, 2): weights(1, 2)}, version=3) == \
        [(0, 1), (0, 5), (1, 2)]
    assert store.add({(0, 1): weights(0, 9)}) == []  # already held: untouched
    assert store.held() == [(0, 1), (0, 5), (1, 2)] and store.version(0, 5) == 3
    g, d = store.get(0, 5)
    assert torch.equal(g, weights(0, 5)[0]) and torch.equal(d, weights(0, 5)[1])
    g.fill_(0)  # get() hands out copies
    assert torch.equal(store.get(0, 5)[0], weights(0, 5)[0])
    check_snapshot(store, 0, {1, 5})
    assert store.drop([(0, 1), (0, 7)]) == [(0, 1)]
    check_snapshot(store, 0, {5})
    assert store.drop([(0, 5)]) == [(0, 5)]
    check_snapshot(store, 0, set())
    check_snapshot(store, 1, {2})


def test_a_pull_copies_into_a_free_slot_without_reallocating():
    store = ExpertStore(E)
    store.add({(0, 0): weights(0, 0)})
    first = store.snapshot(0).gate_up
    store.add({(0, 1): weights(0, 1)})
    assert store.snapshot(0).gate_up.data_ptr() == first.data_ptr()  # the layer's other experts were not copied
    check_snapshot(store, 0, {0, 1})


def test_a_dropped_slot_is_not_reused_while_an_older_reader_runs():
    store = ExpertStore(E)
    store.add({(0, e): weights(0, e) for e in range(4)})  # fills the 4 initial slots
    with store.reading(0) as old:
        slot = old.slot(2)
        store.drop([(0, 2)])
        store.add({(0, 6): weights(0, 6)})  # must not land in expert 2's slot: `old` still reads it
        assert torch.equal(old.gate_up[slot], weights(0, 2)[0])
        check_snapshot(store, 0, {0, 1, 3, 6})
    store.add({(0, 7): weights(0, 7)})  # the reader left: the slot is free again
    assert store.snapshot(0).slot(7) == slot
    check_snapshot(store, 0, {0, 1, 3, 6, 7})


def test_growth_keeps_contents_and_old_readers_their_buffers():
    store = ExpertStore(E)
    store.add({(0, 0): weights(0, 0)})
    with store.reading(0) as old:
        store.add({(0, e): weights(0, e) for e in range(1, 8)})  # beyond the first buffer
        assert torch.equal(old.gate_up[old.slot(0)], weights(0, 0)[0])
    check_snapshot(store, 0, set(range(8)))


def test_add_converts_to_the_store_dtype():
    store = ExpertStore(E, torch.bfloat16)
    store.add({(0, 3): weights(0, 3)})
    assert store.snapshot(0).gate_up.dtype == torch.bfloat16 and store.get(0, 3)[1][0, 0].item() == -3.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1), st.integers(0, E - 1), st.booleans()), max_size=40))
def test_any_sequence_of_adds_drops_and_readers_matches_a_plain_dict(ops):
    """Random adds and drops, some made while a reader holds the snapshot it entered with: every
    snapshot always shows exactly the experts held, each with its own weights."""
    store, model, readers = ExpertStore(E), {0: set(), 1: set()}, []
    for add, layer, expert, hold_reader in ops:
        if hold_reader:  # a reader enters now and stays to the end: its view must never change
            ctx = store.reading(layer)
            readers.append((ctx, ctx.__enter__(), layer, set(model[layer])))
        if add:
            store.add({(layer, expert): weights(layer, expert)})
            model[layer].add(expert)
        else:
            store.drop([(layer, expert)])
            model[layer].discard(expert)
        for lay in (0, 1):
            check_snapshot(store, lay, model[lay])
    for ctx, snap, layer, seen in readers:
        if snap is not None:
            assert set(snap.experts) == seen
            for e in seen:
                assert torch.equal(snap.gate_up[snap.slot(e)], weights(layer, e)[0])
        ctx.__exit__(None, None, None)


def test_a_reservation_is_invisible_until_committed():
    store = ExpertStore(E)
    store.add({(0, 0): weights(0, 0)})
    res = store.reserve(0, 5, ((2 * I, H), (H, I)))
    with pytest.raises(TimeoutError):  # one pull of an expert at a time
        store.reserve(0, 5, ((2 * I, H), (H, I)))
    assert store.reserve(0, 0, ((2 * I, H), (H, I))) is None  # held already
    res.gate_up.copy_(weights(0, 5)[0])
    res.down.copy_(weights(0, 5)[1])
    check_snapshot(store, 0, {0})
    assert not store.holds(0, 5)
    store.commit(res, version=7)
    check_snapshot(store, 0, {0, 5})
    assert store.version(0, 5) == 7


def test_an_aborted_reservation_leaves_nothing_and_frees_its_slot():
    store = ExpertStore(E)
    res = store.reserve(1, 2, ((2 * I, H), (H, I)))
    store.abort(res)
    check_snapshot(store, 1, set())
    assert store.held() == []
    store.add({(1, 2): weights(1, 2)})
    check_snapshot(store, 1, {2})


def test_a_commit_after_the_buffers_grew_copies_what_was_received():
    store = ExpertStore(E)
    res = store.reserve(0, 7, ((2 * I, H), (H, I)))
    store.add({(0, e): weights(0, e) for e in range(5)})  # grows the layer's buffers under the reservation
    res.gate_up.copy_(weights(0, 7)[0])  # the receiver still writes into the old buffer
    res.down.copy_(weights(0, 7)[1])
    store.commit(res)
    check_snapshot(store, 0, {0, 1, 2, 3, 4, 7})


def test_a_pinned_slot_is_not_reused_until_released():
    store = ExpertStore(E)
    store.add({(0, e): weights(0, e) for e in range(4)})
    gate_up, _, release = store.pin(0, 1)
    store.drop([(0, 1)])
    store.add({(0, 6): weights(0, 6)})
    assert torch.equal(gate_up, weights(0, 1)[0])  # still expert 1's bytes
    release()
    release()  # idempotent
    store.add({(0, 7): weights(0, 7)})
    check_snapshot(store, 0, {0, 2, 3, 6, 7})
    with pytest.raises(KeyError):
        store.pin(0, 1)


def test_a_second_pull_of_the_same_expert_waits_for_the_first():
    store = ExpertStore(E)
    res = store.reserve(0, 3, ((2 * I, H), (H, I)))
    with pytest.raises(TimeoutError):
        store.reserve(0, 3, ((2 * I, H), (H, I)), wait_s=0.05)
    got = []
    second = threading.Thread(target=lambda: got.append(store.reserve(0, 3, ((2 * I, H), (H, I)), wait_s=10)))
    second.start()
    res.gate_up.copy_(weights(0, 3)[0])
    res.down.copy_(weights(0, 3)[1])
    store.commit(res)
    second.join(timeout=10)
    assert got == [None]  # the first one brought it: nothing left to do
    check_snapshot(store, 0, {3})
