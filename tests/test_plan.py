"""reconcile() is pure: tested on a simulated pool that applies each step's effect.

The simulator is the only fake: it stands where the actuator and the workers
would, and does to the observed state exactly what each step asks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moecluster.controller import plan as p
from moecluster.controller.observed import Observed, WorkerObservation, WorkerState
from moecluster.controller.placement import imbalance
from moecluster.controller.spec import GENERATE_PAGE_TOKENS, ClusterSpec, as_flags
from pydantic import ValidationError

EXPERTS = tuple((layer, e) for layer in (0, 1) for e in range(8))


class Pool:
    """Workers and a published table, changed only by applying steps."""

    def __init__(self):
        self.workers: dict[str, WorkerObservation] = {}
        self.table: dict = {}
        self.epoch = 0
        self.log: list[p.Step] = []

    def observed(self) -> Observed:
        return Observed(dict(self.workers), EXPERTS)

    def set(self, worker_id, **changes):
        obs = self.workers[worker_id]
        self.workers[worker_id] = WorkerObservation(**{**obs.__dict__, **changes})

    def apply(self, step: p.Step) -> None:
        self.log.append(step)
        match step:
            case p.StartWorker(w):
                self.workers[w] = WorkerObservation(w, f"addr-{w}", 1, WorkerState.SERVING)
            case p.LoadExperts(w, keys) | p.RestoreExperts(w, keys):
                self.set(w, held=self.workers[w].held | set(keys))
            case p.PullExpert(w, key, source, refresh):
                assert key in self.workers[source].held, f"pull of {key} from {source}, which lacks it"
                assert not refresh or key in self.workers[w].held, f"refresh of {key} on {w}, which lacks it"
                versions = {**self.workers[w].versions, key: self.workers[source].versions.get(key, 0)}
                self.set(w, held=self.workers[w].held | {key}, versions=versions)
            case p.Publish(placement):
                for key, holders in placement.items():
                    for w in holders:
                        assert key in self.workers[w].held, f"published {key} on {w} before it was copied there"
                self.table, self.epoch = dict(placement), self.epoch + 1
            case p.DropExperts(w, keys):
                for key in keys:
                    assert w not in self.table.get(key, ()), f"dropped {key} on {w} while the table routes there"
                self.set(w, held=self.workers[w].held - set(keys))
            case p.DrainWorker(w):
                assert all(w not in h for h in self.table.values()), f"drained {w} while the table names it"
                self.set(w, state=WorkerState.DRAINING)
            case p.StopWorker(w):
                assert all(w not in h for h in self.table.values()), f"stopped {w} while the table names it"
                del self.workers[w]

    def converge(self, spec, max_rounds=10) -> int:
        for rounds in range(max_rounds):
            steps = p.reconcile(spec, self.observed(), self.table)
            if not steps:
                return rounds
            for step in steps:
                self.apply(step)
        raise AssertionError(f"no convergence in {max_rounds} rounds; last plan {steps}")

    def kill(self, worker_id):
        self.set(worker_id, state=WorkerState.DEAD)

    def assert_meets(self, spec):
        serving = self.observed().serving
        assert len(serving) == spec.workers + spec.standby_workers
        assert len({w for holders in self.table.values() for w in holders}) == spec.workers  # spares hold nothing
        for key in EXPERTS:
            holders = self.table.get(key, ())
            assert len(set(holders)) >= spec.min_replicas and set(holders) <= set(serving), (key, holders)
        for w, obs in serving.items():
            assert obs.held == {k for k, h in self.table.items() if w in h}, f"{w} holds what the table does not say"


def spec(workers, replicas=1, standby=0):
    return ClusterSpec(model="m", workers=workers, min_replicas=replicas, standby_workers=standby)


def test_fresh_pool_starts_workers_then_loads_then_publishes():
    pool = Pool()
    first = p.reconcile(spec(3, 2), pool.observed(), pool.table)
    assert first == [p.StartWorker("worker-0"), p.StartWorker("worker-1"), p.StartWorker("worker-2")]
    for step in first:
        pool.apply(step)
    second = p.reconcile(spec(3, 2), pool.observed(), pool.table)
    kinds = [type(s).__name__ for s in second]
    assert kinds == ["LoadExperts"] * 3 + ["Publish", "AwaitAcks"]
    pool.converge(spec(3, 2))
    pool.assert_meets(spec(3, 2))
    assert p.reconcile(spec(3, 2), pool.observed(), pool.table) == []


def test_scale_up_copies_before_switch_and_switches_before_drop():
    pool = Pool()
    pool.converge(spec(3, 2))
    pool.log.clear()
    pool.converge(spec(5, 2))
    pool.assert_meets(spec(5, 2))
    kinds = [type(s).__name__ for s in pool.log]
    publish = kinds.index("Publish")
    assert all(k in ("StartWorker", "PullExpert") for k in kinds[:publish])
    assert kinds[publish + 1] == "AwaitAcks"
    assert all(k == "DropExperts" for k in kinds[publish + 2:])
    assert "LoadExperts" not in kinds, "new workers copy from peers, not from the checkpoint"
    pulls = [s for s in pool.log if isinstance(s, p.PullExpert)]
    assert len(pulls) <= 2 * len(EXPERTS) * 2 // 5 + 4, "a scale-up moves about the new workers' share"
    assert len([s for s in pulls if s.worker_id not in ("worker-3", "worker-4")]) <= 2, "onto the new workers"
    # Each layer is spread: 16 copies a layer on 5 workers, at most 4 on one (balancing totals alone put a
    # layer on the two new workers, 6 copies each: imbalance 1.875).
    assert imbalance(pool.table, None, [f"worker-{i}" for i in range(5)]) == pytest.approx(1.25)


def test_scale_down_empties_the_victims_before_stopping_them():
    pool = Pool()
    pool.converge(spec(5, 2))
    pool.log.clear()
    pool.converge(spec(2, 2))
    pool.assert_meets(spec(2, 2))
    kinds = [type(s).__name__ for s in pool.log]
    assert kinds.count("StopWorker") == 3 and kinds.count("DrainWorker") == 3
    assert kinds.index("Publish") < kinds.index("DrainWorker")


def test_dead_worker_leaves_the_table_first_and_is_replaced():
    pool = Pool()
    pool.converge(spec(3, 2))
    pool.kill("worker-1")
    steps = p.reconcile(spec(3, 2), pool.observed(), pool.table)
    assert isinstance(steps[0], p.Publish) and all("worker-1" not in h for h in steps[0].placement.values())
    assert all(len(h) >= 1 for h in steps[0].placement.values()), "with 2 replicas no expert is orphaned"
    pool.converge(spec(3, 2))
    pool.assert_meets(spec(3, 2))
    assert "worker-1" not in pool.workers and "worker-3" in pool.workers


def test_expert_with_no_live_copy_is_reloaded_before_the_table_names_it():
    pool = Pool()
    pool.converge(spec(2, 1))
    pool.kill("worker-0")
    steps = p.reconcile(spec(2, 1), pool.observed(), pool.table)
    publish = next(i for i, s in enumerate(steps) if isinstance(s, p.Publish))
    loads = [s for s in steps[:publish] if isinstance(s, p.LoadExperts)]
    assert loads and all(s.worker_id == "worker-1" for s in loads)
    assert set(steps[publish].placement) == set(EXPERTS), "every expert back in the table at once"
    pool.converge(spec(2, 1))
    pool.assert_meets(spec(2, 1))


def test_a_trained_pool_restores_lost_experts_from_a_snapshot_at_its_step():
    pool = Pool()
    pool.converge(spec(2, 1))
    for w, obs in pool.observed().serving.items():
        pool.set(w, versions=dict.fromkeys(obs.held, 7))
    pool.kill("worker-0")
    steps = p.reconcile(spec(2, 1), pool.observed(), pool.table)
    restores = [s for s in steps if isinstance(s, p.RestoreExperts)]
    assert restores and not any(isinstance(s, p.LoadExperts) for s in steps)
    assert {s.step for s in restores} == {7}, "resumed at the pool's step, so the next update applies"
    lost = {k for k, h in pool.table.items() if h == ("worker-0",)}
    assert {k for s in restores for k in s.experts} == lost
    assert steps.index(restores[-1]) < next(i for i, s in enumerate(steps) if isinstance(s, p.Publish))


def test_a_replica_that_stays_behind_its_peers_is_refreshed_from_the_newest():
    pool = Pool()
    pool.converge(spec(3, 2))
    for w, obs in pool.observed().serving.items():
        pool.set(w, versions=dict.fromkeys(obs.held, 5), version_since=dict.fromkeys(obs.held, 1.0), seen_at=9.0)
    key = next(k for k, h in sorted(pool.table.items()))
    behind, ahead = pool.table[key]
    pool.set(behind, versions={**pool.workers[behind].versions, key: 4})
    pool.set(ahead, versions={**pool.workers[ahead].versions, key: 6}, version_since={key: 9.5})
    assert p.reconcile(spec(3, 2), pool.observed(), pool.table) == [], "within the grace: an update may be in flight"
    pool.set(behind, seen_at=9.5 + p.BEHIND_AFTER_S)
    steps = p.reconcile(spec(3, 2), pool.observed(), pool.table)
    assert steps == [p.PullExpert(behind, key, ahead, refresh=True)] and steps[0].key.startswith("refresh/")
    pool.apply(steps[0])
    assert pool.workers[behind].versions[key] == 6
    assert p.reconcile(spec(3, 2), pool.observed(), pool.table) == []


def test_an_expert_whose_every_copy_missed_an_update_has_nothing_to_refresh_from():
    pool = Pool()
    pool.converge(spec(2, 2))
    for w, obs in pool.observed().serving.items():
        pool.set(w, versions={k: 4 if k == (0, 0) else 5 for k in obs.held}, seen_at=60.0)
    assert p.reconcile(spec(2, 2), pool.observed(), pool.table) == []  # the trainer reports it; no copy is newer
    observed = pool.observed()
    assert (observed.lowest_step, observed.step) == (4, 5)  # what `moectl status` shows as cut off
    pool.set(sorted(observed.serving)[0], versions={k: 3 for k in observed.serving[sorted(observed.serving)[0]].held})
    assert pool.observed().lowest_step == 4, "an expert's newest copy counts, not a replica still behind"


def test_copies_made_before_a_restart_are_not_made_again():
    pool = Pool()
    pool.converge(spec(3, 1))
    pool.converge(spec(3, 1))
    steps = p.reconcile(spec(4, 1), pool.observed(), pool.table)
    for step in steps:
        pool.apply(step)
    plan = p.reconcile(spec(4, 1), pool.observed(), pool.table)
    pulls = [s for s in plan if isinstance(s, p.PullExpert)]
    for step in pulls[: len(pulls) // 2]:  # the controller dies half-way through the copies
        pool.apply(step)
    # After the restart the table is rebuilt from what workers hold, copies included.
    rebuilt: dict = {}
    for w, obs in sorted(pool.workers.items()):
        for key in obs.held:
            rebuilt[key] = rebuilt.get(key, ()) + (w,)
    pool.table = rebuilt
    pool.log.clear()
    pool.converge(spec(4, 1))
    pool.assert_meets(spec(4, 1))
    again = {(s.expert, s.worker_id) for s in pool.log if isinstance(s, p.PullExpert)}
    assert not again & {(s.expert, s.worker_id) for s in pulls[: len(pulls) // 2]}


def test_a_standby_spare_joins_a_scale_up_which_does_not_wait_for_a_start():
    pool = Pool()
    pool.converge(spec(3, 2, standby=1))
    pool.assert_meets(spec(3, 2, standby=1))
    serving = pool.observed().serving
    [spare] = [w for w, obs in serving.items() if not obs.held]
    first = p.reconcile(spec(4, 2, standby=1), pool.observed(), pool.table)
    assert not [s for s in first if isinstance(s, p.StartWorker)], first  # copies to the spare, switch; no start
    assert {s.worker_id for s in first if isinstance(s, p.PullExpert)} == {spare}
    for step in first:
        pool.apply(step)
    assert p.reconcile(spec(4, 2, standby=1), pool.observed(), pool.table) == [p.StartWorker("worker-4", standby=True)]
    pool.converge(spec(4, 2, standby=1))
    pool.assert_meets(spec(4, 2, standby=1))
    pool.converge(spec(2, 2, standby=1))  # down: the pool's victims go, the spare stays
    pool.assert_meets(spec(2, 2, standby=1))
    assert "worker-4" in pool.observed().serving and not pool.observed().serving["worker-4"].held
    pool.converge(spec(2, 2, standby=0))  # no spares wanted: the spare goes
    pool.assert_meets(spec(2, 2))


def test_drained_worker_goes_first():
    pool = Pool()
    pool.converge(spec(4, 2))
    drained = spec(4, 2).draining("worker-0", shrink=True, present=pool.workers)
    assert (drained.workers, drained.drained) == (3, ("worker-0",))
    pool.converge(drained)  # left to itself, the planner would have emptied worker-3 (ties go to the newest)
    assert sorted(pool.workers) == ["worker-1", "worker-2", "worker-3"]
    pool.assert_meets(spec(3, 2))


def test_a_drained_id_is_never_started_again():
    """Observed alone (a restarted controller) knows no id above the live ones: the spec's drained list does."""
    pool = Pool()
    pool.converge(spec(4, 2))
    drained = spec(4, 2).draining("worker-3", shrink=True, present=pool.workers)
    pool.converge(drained)
    assert "worker-3" not in pool.workers
    pool.converge(drained.model_copy(update={"workers": 4}))
    assert sorted(pool.workers) == ["worker-0", "worker-1", "worker-2", "worker-4"]
    pool.assert_meets(spec(4, 2))


def test_a_drained_spare_is_replaced_and_the_pool_keeps_its_size():
    pool = Pool()
    pool.converge(spec(3, 2, standby=1))
    spare = next(w for w, o in pool.workers.items() if not o.held)
    drained = spec(3, 2, standby=1).draining(spare, shrink=False, present=pool.workers)
    assert drained.workers == 3
    pool.converge(drained)
    assert spare not in pool.workers and len(pool.workers) == 4
    pool.assert_meets(spec(3, 2, standby=1))


def test_a_worker_named_drained_without_a_smaller_pool_is_replaced_by_one_started_first():
    """A replace: its successor starts, takes its experts, and only then does it go; the pool never shrinks."""
    pool = Pool()
    pool.converge(spec(3, 2))
    held = pool.workers["worker-1"].held
    replacing = spec(3, 2).draining("worker-1", shrink=False, present=pool.workers)
    assert (replacing.workers, replacing.drained) == (3, ("worker-1",))
    first = p.reconcile(replacing, pool.observed(), pool.table)
    assert first == [p.StartWorker("worker-3")]  # nothing moves before it
    pool.log.clear()
    pool.converge(replacing)
    steps = [type(s).__name__ for s in pool.log]
    assert steps.index("StartWorker") < steps.index("Publish") < steps.index("DrainWorker")
    assert sorted(pool.workers) == ["worker-0", "worker-2", "worker-3"]
    assert pool.workers["worker-3"].held <= held and steps.count("PullExpert") == len(held)  # only its share moved
    pool.assert_meets(spec(3, 2))


def test_a_replace_uses_a_standby_spare_and_starts_a_new_spare_last():
    pool = Pool()
    pool.converge(spec(3, 2, standby=1))
    spare = next(w for w, o in pool.workers.items() if not o.held)
    pool.log.clear()
    pool.converge(spec(3, 2, standby=1).draining("worker-0", shrink=False, present=pool.workers))
    assert pool.workers[spare].held and "worker-0" not in pool.workers
    steps = [type(s).__name__ for s in pool.log]
    assert steps[-1] == "StartWorker" and steps.count("StartWorker") == 1  # the spare's successor, once done
    pool.assert_meets(spec(3, 2, standby=1))


def test_drained_workers_that_are_gone_are_forgotten_oldest_first_beyond_a_bound():
    from moecluster.controller.spec import DRAINED_KEPT

    s = spec(40, 1).model_copy(update={"drained": tuple(f"worker-{i}" for i in range(DRAINED_KEPT))})
    present = {"worker-0", "worker-30"}  # worker-0 is still leaving: never forgotten
    s = s.draining("worker-30", shrink=True, present=present)
    assert len(s.drained) == DRAINED_KEPT and s.drained[0] == "worker-0" and s.drained[-1] == "worker-30"
    assert "worker-1" not in s.drained and s.workers == 39
    again = s.draining("worker-30", shrink=False, present=present)
    assert again.drained.count("worker-30") == 1


def test_migrate_is_copy_switch_drop():
    pool = Pool()
    pool.converge(spec(3, 1))
    key = (1, 2)
    source = pool.table[key][0]
    to = next(w for w in pool.workers if w != source)
    steps = p.migrate(pool.observed(), pool.table, key, to)
    assert [type(s).__name__ for s in steps] == ["PullExpert", "Publish", "AwaitAcks", "DropExperts"]
    for step in steps:
        pool.apply(step)
    assert pool.table[key] == (to,)
    pool.converge(spec(3, 1))  # a rebalance may follow, but it moves other experts: the user's choice stays
    assert pool.table[key] == (to,)
    pool.assert_meets(spec(3, 1))
    assert p.migrate(pool.observed(), pool.table, key, to) == []  # asked again: done already
    assert p.migrate(pool.observed(), pool.table, key, to, source) == []
    with pytest.raises(ValueError, match="not serving"):
        p.migrate(pool.observed(), pool.table, key, "worker-9")
    with pytest.raises(ValueError, match="not in the routing table"):
        p.migrate(pool.observed(), pool.table, (7, 7), to)


def test_a_migrate_asked_again_after_the_copy_finishes_the_switch_and_the_drop():
    """Cut off after the pull: the restarted controller publishes both copies; asked again with the same
    source, the move is switched and the source's copy dropped, nothing pulled twice."""
    pool = Pool()
    pool.converge(spec(3, 1))
    key = (0, 5)
    source = pool.table[key][0]
    to = next(w for w in pool.workers if w != source)
    pull = p.migrate(pool.observed(), pool.table, key, to, source)[0]
    pool.apply(pull)
    pool.apply(p.Publish({**pool.table, key: (source, to)}))  # what a restarted controller finds and publishes
    rest = p.migrate(pool.observed(), pool.table, key, to, source)
    assert [type(s).__name__ for s in rest] == ["Publish", "AwaitAcks", "DropExperts"]
    for step in rest:
        pool.apply(step)
    assert pool.table[key] == (to,) and key not in pool.workers[source].held
    assert p.migrate(pool.observed(), pool.table, key, to, source) == []
    pool.apply(p.PullExpert(source, key, to))
    pool.apply(p.Publish({**pool.table, key: (to, source)}))
    with pytest.raises(ValueError, match="fewer than 2 copies"):  # a second copy the spec asks for is kept
        p.migrate(pool.observed(), pool.table, key, to, source, min_replicas=2)


def test_spec_validation_says_what_is_wrong():
    with pytest.raises(ValueError, match="min_replicas \\(3\\) cannot exceed workers \\(2\\)"):
        spec(2, 3)
    with pytest.raises(ValueError):
        ClusterSpec(model="m", workers=0)
    with pytest.raises(ValueError, match="worker_batch_tokens"):
        ClusterSpec(model="m", workers=1, worker_batch_tokens=-1)
    with pytest.raises(ValueError, match="generate_cache_tokens \\(31\\) is below one page"):
        ClusterSpec(model="m", workers=1, generate_cache_tokens=31)


def test_serving_settings_are_the_processes_keywords_and_flags_and_only_those_set():
    from moecluster.frontend.generation_batcher import PAGE_TOKENS

    assert GENERATE_PAGE_TOKENS == PAGE_TOKENS  # the spec checks the frontend's page without importing transformers
    unset = spec(2, 1)
    assert (unset.worker_settings(), unset.frontend_settings()) == ({}, {})
    full = ClusterSpec(model="m", workers=1, worker_batch_tokens=0, worker_compute_threads=1, generate_cache_tokens=0,
                       forward_batch_tokens=512)
    assert full.worker_settings() == {"batch_tokens": 0, "compute_threads": 1}
    assert as_flags(full.worker_settings()) == ["--batch-tokens", "0", "--compute-threads", "1"]
    assert as_flags(full.frontend_settings()) == ["--generate-cache-tokens", "0", "--forward-batch-tokens", "512"]
    assert unset.frontend_access() == {}
    guarded = ClusterSpec(model="m", workers=1, api_keys_file="/k", tls_cert_file="/c", tls_key_file="/p")
    assert as_flags(guarded.frontend_access()) == ["--api-keys", "/k", "--tls-cert", "/c", "--tls-key", "/p"]
    with pytest.raises(ValidationError, match="TLS needs both"):
        ClusterSpec(model="m", workers=1, tls_cert_file="/c")


@settings(max_examples=40, deadline=None)
@given(events=st.lists(st.one_of(st.tuples(st.just("scale"), st.integers(2, 6)),
                                 st.tuples(st.just("kill"), st.integers(0, 20))), min_size=1, max_size=6),
       replicas=st.integers(1, 2), standby=st.integers(0, 2))
def test_any_sequence_of_scales_and_deaths_converges_to_the_spec(events, replicas, standby):
    pool = Pool()
    current = spec(3, replicas, standby)
    pool.converge(current)
    for kind, value in events:
        if kind == "scale":
            current = spec(max(value, replicas), replicas, standby)
        else:
            serving = sorted(pool.observed().serving)
            pool.kill(serving[value % len(serving)])
        pool.converge(current)
        pool.assert_meets(current)


def test_load_counts_only_the_copies_workers_hold_now():
    """A dropped copy's rate decays over a few heartbeats while its new holder's counts at once: summed, every
    move would look like a hot expert and the planner would chase it."""
    moved_from = WorkerObservation("worker-0", "a", 1, WorkerState.SERVING, held=frozenset({(0, 1)}),
                                   load={(0, 1): 10.0, (0, 2): 8.0})  # (0, 2) dropped a moment ago
    moved_to = WorkerObservation("worker-1", "b", 2, WorkerState.SERVING, held=frozenset({(0, 2)}), load={(0, 2): 9.0})
    assert Observed({"worker-0": moved_from, "worker-1": moved_to}, EXPERTS).load() == {(0, 1): 10.0, (0, 2): 9.0}


def lay_out(pool: Pool, table: dict, load: dict | None = None) -> None:
    """As if the controller had published `table`: every worker holds (and serves `load` of) what it names."""
    for w in pool.workers:
        held = frozenset(k for k, hs in table.items() if w in hs)
        pool.set(w, held=held, load={k: (load or {}).get(k, 0.0) / len(table[k]) for k in held})
    pool.table = dict(table)


def test_a_layer_crowded_onto_few_workers_is_spread_though_every_worker_carries_as_much():
    pool = Pool()
    pool.converge(spec(4))
    # Every worker holds 4 experts, but each layer is on two workers: it waits for one doing half its work.
    crowded = {(layer, e): (f"worker-{2 * layer + e // 4}",) for layer, e in EXPERTS}
    lay_out(pool, crowded)
    workers = sorted(pool.workers)
    assert imbalance(crowded, None, workers) == 2.0
    pool.log.clear()
    pool.converge(spec(4))
    assert imbalance(pool.table, None, workers) == 1.0
    assert len([s for s in pool.log if isinstance(s, p.PullExpert)]) <= 8  # half of each layer, no more


def test_a_layer_waiting_for_a_hot_expert_is_re_placed_only_where_a_plan_can_do_better():
    pool = Pool()
    capped = ClusterSpec(model="m", workers=4, max_replicas=1)
    pool.converge(capped)
    hot = {k: 10.0 for k in EXPERTS} | {(0, 3): 1000.0}
    lay_out(pool, pool.table, hot)
    assert imbalance(pool.table, hot, sorted(pool.workers)) > 3.0
    # One copy at most: layer 0 waits for the worker holding (0, 3) whatever the plan, so nothing moves.
    assert p.reconcile(capped, pool.observed(), pool.table) == []
    # With copies allowed, the hot expert is split.
    steps = p.reconcile(spec(4), pool.observed(), pool.table)
    assert [s.expert for s in steps if isinstance(s, p.PullExpert)].count((0, 3)) == 3


def test_a_settled_pool_looks_for_a_better_balance_only_when_the_caller_says_it_is_time():
    pool = Pool()
    pool.converge(spec(4))
    lay_out(pool, {(layer, e): (f"worker-{2 * layer + e // 4}",) for layer, e in EXPERTS})  # crowded layers
    assert p.reconcile(spec(4), pool.observed(), pool.table, rebalance_settled=False) == []
    assert any(isinstance(s, p.Publish) for s in p.reconcile(spec(4), pool.observed(), pool.table))
