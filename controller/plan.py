"""plan = reconcile(spec, observed, table): the next steps, as values.

Pure: no I/O, no clock. The control loop runs the plan, observes again and
reconciles again until the plan is empty (level-triggered, as KubeRay does),
so a controller restarted in the middle of a plan simply computes the rest of
it from what the workers report. Every step is idempotent on the worker side
(pulling a held expert, dropping a missing one, starting a started worker are
no-ops), and each carries a key naming the operation.

Order within a plan is the zero-downtime rule: copy before switch (pulls and
loads, then Publish), switch before drop (AwaitAcks, then drops), and a worker
leaves the pool only once no published table names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moecluster.controller.affinity import Pair, regroup
from moecluster.controller.observed import ExpertKey, Observed, WorkerState, worker_index
from moecluster.controller.placement import imbalance, moves, place
from moecluster.controller.spec import ClusterSpec

Placement = dict[ExpertKey, tuple[str, ...]]


@dataclass(frozen=True)
class StartWorker:
    worker_id: str
    standby: bool = False  # a spare that holds nothing until a scale-up takes it: the pool does not wait for it

    @property
    def key(self) -> str:
        return f"start/{self.worker_id}" + ("/standby" if self.standby else "")


@dataclass(frozen=True)
class LoadExperts:
    """Read experts from the checkpoint (when no live copy exists to pull from)."""

    worker_id: str
    experts: tuple[ExpertKey, ...]

    @property
    def key(self) -> str:
        return f"load/{self.worker_id}/{len(self.experts)}"


@dataclass(frozen=True)
class RestoreExperts:
    """Experts of a trained pool that lost every copy: back from the latest snapshot, resumed at
    `step` (the pool's); the steps in between are lost, and reported."""

    worker_id: str
    experts: tuple[ExpertKey, ...]
    step: int

    @property
    def key(self) -> str:
        return f"restore/{self.worker_id}/{len(self.experts)}"


@dataclass(frozen=True)
class PullExpert:
    """`worker_id` copies `expert` from `source` while both serve; with `refresh`, a copy it holds is
    replaced by the source's newer one (a replica that missed a training update catches up)."""

    worker_id: str
    expert: ExpertKey
    source: str
    refresh: bool = False

    @property
    def key(self) -> str:
        return f"{'refresh' if self.refresh else 'pull'}/{self.expert[0]}/{self.expert[1]}/{self.worker_id}"


@dataclass(frozen=True)
class Publish:
    """A new routing table (epoch + 1) with this placement."""

    placement: Placement

    @property
    def key(self) -> str:
        return f"publish/{hash(tuple(sorted(self.placement.items())))}"


@dataclass(frozen=True)
class AwaitAcks:
    """Every frontend routes by the last published epoch (or has gone)."""

    @property
    def key(self) -> str:
        return "await-acks"


@dataclass(frozen=True)
class DropExperts:
    worker_id: str
    experts: tuple[ExpertKey, ...]

    @property
    def key(self) -> str:
        return f"drop/{self.worker_id}/{len(self.experts)}"


@dataclass(frozen=True)
class DrainWorker:
    worker_id: str

    @property
    def key(self) -> str:
        return f"drain/{self.worker_id}"


@dataclass(frozen=True)
class StopWorker:
    worker_id: str

    @property
    def key(self) -> str:
        return f"stop/{self.worker_id}"


Step = StartWorker | LoadExperts | RestoreExperts | PullExpert | Publish | AwaitAcks | DropExperts | DrainWorker | StopWorker
COPIES = (LoadExperts, RestoreExperts, PullExpert)  # the steps that write expert state: trainers pause for them

# A replica still below a peer's version this long after the peer reported it missed that update; it is
# not one in flight (a trainer sends a step's update to every holder at once, and re-syncs the ones that
# refused before its next step).
BEHIND_AFTER_S = 1.0


def reconcile(spec: ClusterSpec, observed: Observed, table: Placement, pairs: Mapping[Pair, float] | None = None,
              regroup_settled: bool = True, rebalance_settled: bool = True) -> list[Step]:
    """The next steps from `observed` and the published `table` towards `spec`; [] when converged.

    Workers in `spec.drained` that still serve are emptied and stopped first; they do not count in the pool,
    so one drained without a smaller pool (a replace) has its successor started before it is emptied.
    `pairs` (tokens/s that picked two experts together), when given, co-locates them (`affinity.regroup`):
    in every new placement, and in a settled one when `regroup_settled`. A settled pool is re-placed for balance
    only when `rebalance_settled` (the caller paces both searches: a big pool's plan takes a while).
    """
    serving = observed.serving
    gone = {w for w in _holders(table) if w not in serving}
    if gone:
        return _heal(spec, observed, table, gone)

    starting = observed.in_state(WorkerState.STARTING)
    finished = observed.in_state(WorkerState.DRAINING, WorkerState.DEAD)
    if finished:  # out of the table already: stop them for good
        return [StopWorker(w) for w in sorted(finished)]
    behind = _refresh_behind(observed, table)
    if behind:  # they would answer with the weights of an older step: catch them up before anything else
        return behind
    staying = [w for w in serving if w not in spec.drained]
    missing = spec.workers + spec.standby_workers - len(staying) - len(starting)
    if len(staying) < spec.workers:  # the pool itself is short: start what is missing (spares too), wait for them
        return [StartWorker(w) for w in _new_ids(spec, observed, missing)] if missing > 0 else []

    victims, keep = _members(spec, serving, table)
    capacity = {w: spec.capacity_for(len(observed.experts), len(keep)) for w in keep}
    load = observed.load()
    if sum(load.values()) < spec.rebalance_min_load:
        load = {}  # a trickle of requests says nothing about which experts are hot
    per_worker = {w: sum(1 for holders in table.values() if w in holders) for w in keep}
    complete = all(len([w for w in table.get(k, ()) if w in capacity]) >= spec.min_replicas for k in observed.experts)
    fits = all(0 < per_worker[w] <= capacity[w] for w in keep)  # nobody idle, nobody over capacity
    settled = complete and fits and not victims and set(table) == set(observed.experts)
    weights = load or dict.fromkeys(observed.experts, 1.0)
    skew = imbalance(table, weights, keep)
    target = dict(table)  # nothing to gain from moving bytes, unless for experts tokens pick together
    if not settled or (rebalance_settled and skew > spec.rebalance_above):
        # Extra copies only where observed load asks for them: without load there is no hot expert.
        candidate = place(observed.experts, capacity, load=load or None, current=table, dead=victims,
                          min_replicas=spec.min_replicas, max_replicas=spec.max_replicas if load else spec.min_replicas)
        # For balance alone, moving bytes must pay: the new placement must cut the imbalance by half the margin
        # (a layer with fewer experts than workers may never come near 1.0; load noise must not churn).
        if not settled or skew - imbalance(candidate, weights, keep) >= (spec.rebalance_above - 1) / 2:
            target = candidate
    if pairs and (regroup_settled or not settled):
        target = regroup(target, pairs, workers=keep, load=load or None)

    steps: list[Step] = []
    loads: dict[str, list[ExpertKey]] = {}
    for key, worker_id in moves(table, target):
        if key in serving[worker_id].held:
            continue  # already copied (e.g. before a controller restart): nothing to pull
        sources = [w for w in table.get(key, ()) if w in serving]
        if sources:
            steps.append(PullExpert(worker_id, key, sources[0]))
        else:
            loads.setdefault(worker_id, []).append(key)
    steps += [_load(w, keys, observed) for w, keys in sorted(loads.items())]
    if target != table:
        steps += [Publish(target), AwaitAcks()]
    for worker_id in keep:
        stale = tuple(sorted(k for k in serving[worker_id].held if worker_id not in target.get(k, ())))
        if stale:
            steps.append(DropExperts(worker_id, stale))
    for worker_id in sorted(victims):
        steps += [DrainWorker(worker_id), StopWorker(worker_id)]
    if not steps and missing > 0:  # spares last, once the pool is done: a scale-up never waits for one to start
        steps = [StartWorker(w, standby=True) for w in _new_ids(spec, observed, missing)]
    return steps


def _members(spec: ClusterSpec, serving, table: Placement) -> tuple[set[str], list[str]]:
    """(victims, the pool to place over): drained workers go; workers in the table stay unless the pool is
    too big (then the cheapest to empty go); empty workers join while it is too small; of the rest,
    `standby_workers` wait as spares and any more go."""
    in_table = _holders(table) & set(serving)
    victims = {w for w in spec.drained if w in serving}
    placed = {w: serving[w] for w in in_table if w not in victims}
    victims |= _victims(placed, table, spec.min_replicas, len(placed) - spec.workers)
    keep = [w for w in placed if w not in victims]
    idle = sorted((w for w in serving if w not in in_table and w not in victims), key=worker_index)
    joining = idle[:max(0, spec.workers - len(keep))]
    victims |= set(idle[len(joining) + spec.standby_workers:])
    return victims, sorted(keep + joining)


def migrate(observed: Observed, table: Placement, expert: ExpertKey, to: str, source: str | None = None,
            min_replicas: int = 1) -> list[Step]:
    """Moves one copy of `expert` to worker `to` (from `source`, or from any holder): copy, switch, drop.

    Asked again (a call cut off by a controller restart, whose successor publishes every copy it finds),
    it does what is left: [] once `to` holds the expert and `source`, if named, no longer does.
    ValueError with what is wrong when the move is impossible.
    """
    serving = observed.serving
    holders = table.get(expert)
    if holders is None:
        raise ValueError(f"expert {expert} is not in the routing table")
    if to not in serving:
        raise ValueError(f"worker {to!r} is not serving; serving workers: {sorted(serving)}")
    if to in holders:
        if source in (None, to) or source not in holders:
            return []
        if len(holders) - 1 < min_replicas:
            raise ValueError(f"{to!r} and {source!r} both hold expert {expert}: dropping {source}'s copy would leave "
                             f"fewer than {min_replicas} copies")
        target = {**table, expert: tuple(w for w in holders if w != source)}
        return [Publish(target), AwaitAcks(), DropExperts(source, (expert,))]
    source = source or holders[0]
    if source not in holders:
        raise ValueError(f"worker {source!r} does not hold expert {expert}; holders: {list(holders)}")
    target = dict(table)
    target[expert] = tuple(to if w == source else w for w in holders)
    return [PullExpert(to, expert, source), Publish(target), AwaitAcks(), DropExperts(source, (expert,))]


def _heal(spec: ClusterSpec, observed: Observed, table: Placement, gone: set[str]) -> list[Step]:
    """Take lost workers out of the table at once; reload experts that lost every copy."""
    serving = observed.serving
    survivors = {k: tuple(w for w in holders if w not in gone) for k, holders in table.items()}
    orphans = [k for k, holders in survivors.items() if not holders] + [k for k in observed.experts if k not in table]
    steps: list[Step] = []
    if orphans and serving:
        capacity = {w: spec.capacity_for(len(observed.experts), len(serving)) for w in serving}
        rescue = place(orphans, capacity, current={k: () for k in orphans}, min_replicas=1)
        by_worker: dict[str, list[ExpertKey]] = {}
        for key, holders in rescue.items():
            by_worker.setdefault(holders[0], []).append(key)
            survivors[key] = holders[:1]
        steps += [_load(w, keys, observed) for w, keys in sorted(by_worker.items())]
    placement = {k: h for k, h in survivors.items() if h}
    steps.append(Publish(placement))
    dead = observed.in_state(WorkerState.DEAD)
    steps += [StopWorker(w) for w in sorted(dead)]
    return steps


def _refresh_behind(observed: Observed, table: Placement) -> list[Step]:
    """A refresh for each holder in the table whose version of an expert has stayed below another
    holder's for BEHIND_AFTER_S (a trainer that died mid-update, or could not re-sync it): it copies
    weights, moments and version from the holder with the newest."""
    serving = observed.serving
    steps: list[Step] = []
    for key, holders in sorted(table.items()):
        live = [w for w in holders if w in serving and key in serving[w].versions]
        if len(live) < 2:
            continue
        newest = max(live, key=lambda w: serving[w].versions[key])  # the first of the newest, in table order
        top, since = serving[newest].versions[key], serving[newest].version_since.get(key, serving[newest].seen_at)
        steps += [PullExpert(w, key, newest, refresh=True) for w in live
                  if serving[w].versions[key] < top and serving[w].seen_at - since >= BEHIND_AFTER_S]
    return steps


def _load(worker_id: str, keys: list[ExpertKey], observed: Observed) -> LoadExperts | RestoreExperts:
    """Experts with no live copy: from the checkpoint, or, once the pool has trained, from a snapshot."""
    if observed.step > 0:
        return RestoreExperts(worker_id, tuple(sorted(keys)), observed.step)
    return LoadExperts(worker_id, tuple(sorted(keys)))


def _victims(serving, table: Placement, min_replicas: int, count: int) -> set[str]:
    """The `count` workers cheapest to empty: fewest experts that would fall below min_replicas, least held."""
    if count <= 0:
        return set()
    copies: dict[ExpertKey, int] = {k: len([w for w in h if w in serving]) for k, h in table.items()}

    def cost(worker_id: str) -> tuple[int, int, int]:
        mine = [k for k in serving[worker_id].held if worker_id in table.get(k, ())]
        at_risk = sum(1 for k in mine if copies.get(k, 0) <= min_replicas)
        return at_risk, len(mine), -worker_index(worker_id)

    return set(sorted(serving, key=cost)[:count])


def _new_ids(spec: ClusterSpec, observed: Observed, count: int) -> list[str]:
    """Ids never used: a drained id would be drained again at once (the spec names it)."""
    used = [*observed.workers, *spec.drained]
    start = max(observed.next_index, max(map(worker_index, used), default=-1) + 1)
    return [f"worker-{i}" for i in range(start, start + count)]


def _holders(table: Placement) -> set[str]:
    return {w for holders in table.values() for w in holders}
