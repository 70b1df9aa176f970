"""The controller: observe, reconcile, execute, in a loop that never dies.

Desired state is the spec; observed state comes from the workers; the plan is
`reconcile`'s return value; the executor carries it out through one actuator.
On start it rebuilds everything from what the backend started and what the
workers hold, so it can be killed and restarted at any moment while the data
path keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from moecluster.controller import plan as p
from moecluster.controller import remote_snapshots
from moecluster.controller.actuator import Actuator, WorkerHandle
from moecluster.controller.affinity import colocated_share
from moecluster.controller.executor import Executor, Replan, StepFailed, watched
from moecluster.controller.limit_shares import ShareBook
from moecluster.controller.metrics import ControllerMetrics
from moecluster.controller.monitor import WorkerMonitor
from moecluster.controller.observed import ExpertKey, WorkerState
from moecluster.controller.pair_rates import PairRates
from moecluster.controller.placement import imbalance, layer_imbalance
from moecluster.controller.progress import progress_line
from moecluster.controller.publisher import LEASE_S, Publisher
from moecluster.controller.spec import ClusterSpec
from moecluster.protos import worker_pb2
from moecluster.workers.snapshot_folders import Snapshot, partial_name

log = logging.getLogger("moecluster.controller")
REGROUP_EVERY_S = 10.0  # with spec.colocate: how often a converged pool looks again at what tokens pick together
# How often a converged pool whose layers wait over rebalance_above looks for a better placement, and how long
# after any change: a plan of a big pool takes a tenth of a second or more (a layout no plan can improve would
# have it made every tick), and a moved copy's load takes a few heartbeats to show in the rates (judged on them
# at once, the move looks like a shift in load, and the planner chases it).
REBALANCE_EVERY_S = 2.0


class Refused(RuntimeError):
    """A request that cannot be carried out in the cluster's present state (the text says what to do)."""


class Controller:
    def __init__(self, spec: ClusterSpec, actuator: Actuator, experts: tuple[ExpertKey, ...], *,
                 address: str = "", save_spec: Callable[[ClusterSpec], None] = lambda spec: None,
                 heartbeat: float = 0.25, dead_after: float = 1.0, ack_timeout: float = 5.0, start_timeout: float = 120.0):
        """`start_timeout`: seconds a new worker has to serve before its start counts as failed (and is tried again)."""
        self.spec = spec
        self.actuator = actuator
        self.address = address  # where frontends reach this controller
        self.save_spec = save_spec
        self.metrics = ControllerMetrics()
        self.publisher = Publisher()
        self._wake = threading.Event()
        self.monitor = WorkerMonitor(experts, period=heartbeat, dead_after=dead_after, on_change=self._wake.set)
        self.executor = Executor(actuator, self.monitor, self.publisher, self.metrics, ack_timeout=ack_timeout,
                                 start_timeout=start_timeout, snapshot_dir=spec.snapshot_dir)
        self.last_snapshot: Snapshot | None = None
        self.last_restore = ""  # "step N from PATH at step M"
        self.snapshots = remote_snapshots.Listing()  # what the snapshot directory holds, for status
        self.pair_rates = PairRates()  # experts tokens pick together, as frontends report them
        self.limit_shares = ShareBook()  # API-key holders' limits, divided among the frontends
        self._regroup_at = time.monotonic() + REGROUP_EVERY_S  # the first reports come in meanwhile
        self._rebalance_at = time.monotonic() + REBALANCE_EVERY_S  # rates need a few heartbeats
        self._last_snapshot_at = time.monotonic()
        self._plan_lock = threading.Lock()  # one plan at a time: the loop's, or a user's migrate
        self._spec_lock = threading.Lock()  # a drain or a scale reads the spec to write it
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="control-loop", daemon=True)
        self.converged = False
        self.last_error = ""
        self.frontend: WorkerHandle | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "Controller":
        """Rebuilds observed state from the backend and the workers, publishes it, starts the loop."""
        self.monitor.start()
        for handle in self.actuator.workers():
            self.monitor.add(handle)
        observed = self.monitor.snapshot()
        placement: dict[ExpertKey, tuple[str, ...]] = {}
        for worker_id, obs in sorted(observed.serving.items()):
            for key in obs.held:
                placement[key] = placement.get(key, ()) + (worker_id,)
        if placement:
            addresses = {w: o.address for w, o in observed.workers.items()}
            self.publisher.publish(placement, addresses, min_epoch=observed.max_epoch() + 1)
            self.publisher.expect_reconnects()
            log.info("recovered %d workers and %d experts; epoch %d", len(observed.serving), len(placement),
                     self.publisher.table.epoch)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        self.publisher.close()
        self._thread.join(timeout=10)
        self.monitor.stop()

    def shutdown(self) -> None:
        """Stops the frontend and every worker, then the controller."""
        self.stop()
        self.actuator.stop_all()

    # -- the loop ------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self.reconcile_once()
            except (StepFailed, Replan) as err:
                self.last_error = str(err)
                log.warning("plan interrupted: %s", err)
                self._wake.set()
                time.sleep(0.05)
            except Exception as err:  # noqa: BLE001 - the loop must outlive any one bad step
                self.last_error = f"{type(err).__name__}: {err}"
                log.exception("reconcile failed")
                time.sleep(0.5)

    def reconcile_once(self) -> list[p.Step]:
        with self._plan_lock:
            observed = self.monitor.snapshot()
            pairs = self.pair_rates.rates() if self.spec.colocate else None
            now = time.monotonic()
            due, rebalance = now >= self._regroup_at, now >= self._rebalance_at
            steps = p.reconcile(self.spec, observed, self.publisher.table.placement, pairs, regroup_settled=due,
                                rebalance_settled=rebalance)
            if not steps and due:  # nothing (more) to co-locate: look again in a while
                self._regroup_at = now + REGROUP_EVERY_S
            if steps or rebalance:  # nothing to balance, or something changed: rates settle first
                self._rebalance_at = now + REBALANCE_EVERY_S
            spares_only = all(isinstance(s, p.StartWorker) and s.standby for s in steps)  # the pool itself is done
            self.converged = spares_only and len(self._pool(observed)) == self.spec.workers and bool(
                self.publisher.table.placement)
            if self.converged:
                self.last_error = ""
                self._update_gauges(observed)
                self._snapshot_if_due(observed)
                if self.frontend is None:
                    self.frontend = self.actuator.start_frontend(self.address, timeout=120)
            if self.frontend is not None and not self.actuator.frontend_alive():
                log.warning("the frontend at %s is gone; starting it again", self.frontend.address)
                self.frontend = self.actuator.start_frontend(self.address, timeout=120)
            if steps:
                log.info("plan: %s", ", ".join(s.key for s in steps[:8]) + (" ..." if len(steps) > 8 else ""))
                self.executor.run(steps)
                self._wake.set()  # plan again right away: the next phase may be ready
            return steps

    def _pool(self, observed) -> list[str]:
        """Serving workers the routing table names (standby spares hold nothing and are not in it), less the
        drained ones still leaving."""
        named = {w for holders in self.publisher.table.placement.values() for w in holders}
        return sorted(w for w in observed.serving if w in named and w not in self.spec.drained)

    def _snapshot_if_due(self, observed) -> None:
        """Periodic snapshots of a pool that trained since the last one."""
        every, root = self.spec.snapshot_every_s, self.spec.snapshot_dir
        if not (every and root) or time.monotonic() - self._last_snapshot_at < every:
            return
        if observed.step == 0 or (self.last_snapshot is not None and self.last_snapshot.step >= observed.step):
            return
        for line in self._take_snapshot(root):
            if isinstance(line, str):
                log.info("%s", line)

    def snapshot(self, directory: str = "") -> Iterator[str | Snapshot]:
        """Writes every expert's state at a step boundary into DIRECTORY/step-NNNNNNNN/; yields progress,
        then the snapshot."""
        root = directory or self.spec.snapshot_dir
        if not root:
            raise ValueError("no snapshot directory: give one, or start the cluster with a snapshot_dir")
        with self._plan_lock:
            yield from self._take_snapshot(root)

    def check_snapshot_dir(self, directory: str = "") -> Iterator[str]:
        """ValueError unless DIRECTORY (default the cluster's) is a directory every worker of the pool can write
        into: a trainer asks before its first step, not at its first save, maybe hours later."""
        root = directory or self.spec.snapshot_dir
        if not root:
            raise ValueError("no snapshot directory: give one, or start the cluster with a snapshot_dir")
        workers, refused = self._pool(self.monitor.snapshot()), []
        for worker_id in workers:
            try:
                remote_snapshots.listed(self.monitor.stub(worker_id), root, writable=True)
            except grpc.RpcError as err:
                refused.append(f"{worker_id}: {err.details() or err.code().name}")
        if refused:
            raise ValueError(f"cannot save into {root}: " + "; ".join(refused))
        yield f"{root}: a directory all {len(workers)} workers can write into"

    def _take_snapshot(self, root: str) -> Iterator[str | Snapshot]:
        partial = partial_name(root)  # made by the first worker that writes into it
        writer = None
        try:
            with self.executor.paused():
                table = self.publisher.table.placement
                if not table:
                    raise ValueError("the pool holds no experts yet")
                workers = self.monitor.snapshot().workers
                by_worker: dict[str, list[ExpertKey]] = {}
                for key, holders in sorted(table.items()):  # from the newest copy (a replica may have missed an update)
                    newest = max(holders, key=lambda w: workers[w].versions.get(key, -1) if w in workers else -1)
                    by_worker.setdefault(newest, []).append(key)
                files = []
                for worker_id, keys in sorted(by_worker.items()):
                    request = worker_pb2.WriteSnapshotRequest(
                        directory=partial, experts=[worker_pb2.ExpertKey(layer=l, expert=e) for l, e in keys])
                    writer = writer or worker_id  # the first one asked made the folder: it seals or discards it
                    try:
                        files += watched(self.monitor, self.monitor.stub(worker_id).WriteSnapshot, request, 300,
                                         worker_id).files
                    except grpc.RpcError as err:
                        raise StepFailed(f"snapshot: {worker_id} could not write: {err.code().name}: {err.details()}") from None
                    except Replan as err:
                        raise StepFailed(f"snapshot: {err}") from None
                    yield f"{worker_id}: wrote {len(keys)} experts"
            steps = {f.version for f in files}
            if len(steps) != 1:
                raise ValueError(f"experts are at different versions {sorted(steps)}: not a step boundary")
            try:
                snap = remote_snapshots.seal(self.monitor.stub(writer), partial, steps.pop(), files,
                                             keep=self.spec.snapshot_keep)
            except grpc.RpcError as err:
                raise StepFailed(f"snapshot: {writer} could not seal it: {err.code().name}: {err.details()}") from None
        except BaseException:
            if writer is not None:
                remote_snapshots.discard(self.monitor.stub(writer), partial)
            raise
        self.last_snapshot, self._last_snapshot_at = snap, time.monotonic()
        self.snapshots.changed()
        yield f"snapshot of step {snap.step}: {len(files)} experts in {snap.path}"
        yield snap

    def restore(self, source: str = "", session: str = "") -> Iterator[str | Snapshot]:
        """Rolls every expert back to a snapshot (SOURCE's own, or the newest good one under SOURCE or the
        snapshot directory), at a step boundary; yields progress, then the snapshot restored. Refused while
        a trainer other than `session` is connected: its dense model would no longer match the experts."""
        source = source or self.spec.snapshot_dir
        if not source:
            raise ValueError("no snapshot given, and the cluster has no snapshot directory")
        with self._plan_lock:
            reader = next(iter(self._pool(self.monitor.snapshot())), None)
            if reader is None:
                raise Refused("no worker is serving yet")
            try:
                candidates = remote_snapshots.candidates(self.monitor.stub(reader), source)
            except grpc.RpcError as err:
                raise StepFailed(f"restore: {reader} could not list {source}: {err.details() or err.code().name}") from None
            yield from self._await_no_trainer(session)
            step_before = self.monitor.snapshot().step
            with self.executor.paused():
                for item in self.executor.restore_pool(candidates):
                    if isinstance(item, str):
                        yield item
                    else:
                        snap = item
        self.last_restore = f"step {snap.step} from {snap.path} at step {step_before}"
        self.snapshots.changed()
        log.warning("pool restored to %s", self.last_restore)
        yield f"every expert back at step {snap.step} ({step_before - snap.step} updates undone) from {snap.path}"
        yield snap

    def _await_no_trainer(self, session: str) -> Iterator[str]:
        """Returns once no trainer but `session` is connected. One that just stopped may still look connected
        (its stream closes a moment later) or be within its lease (it may come back): waits that long, then
        refuses."""
        deadline = time.monotonic() + LEASE_S + 1.0
        waited = False
        while others := [t for t in self.publisher.trainers() if t != session]:
            if time.monotonic() > deadline:
                raise Refused(f"trainers {others} are connected: stop them before a restore (their dense weights "
                              "would no longer match the experts)")
            if not waited:
                yield f"waiting up to {LEASE_S + 1:.0f}s for trainers {others} to disconnect"
                waited = True
            time.sleep(0.2)

    def _update_gauges(self, observed) -> None:
        table, pool = self.publisher.table.placement, self._pool(observed)
        load = _traffic(observed, table)
        if load:
            self.metrics.gauge("imbalance", imbalance(table, load, pool))
            self.metrics.labelled_gauge("layer_imbalance", "layer",  # which layer waits, on a dashboard
                                        {str(layer): x for layer, x in layer_imbalance(table, load, pool).items()})
        pairs = self.pair_rates.rates()
        if pairs:
            self.metrics.gauge("colocated_share", colocated_share(table, pairs))
        self.metrics.gauge("workers_serving", len(pool))
        self.metrics.gauge("workers_desired", self.spec.workers)  # an alert compares the two
        self.metrics.gauge("workers_standby", len(observed.serving) - len(pool))

    # -- what users ask ----------------------------------------------------------

    def scale(self, workers: int, timeout: float = 600.0) -> Iterator[str]:
        """Sets the pool size; yields progress until the new layout serves."""
        started = time.monotonic()
        with self._spec_lock:  # read and written at once: a drain meanwhile keeps its worker named
            self._set_spec(ClusterSpec.model_validate({**self.spec.model_dump(), "workers": workers}))
        yield f"scaling to {workers} workers"
        yield from self._await_converged(timeout)
        self.metrics.scale_seconds(time.monotonic() - started)

    def update_spec(self, spec: ClusterSpec) -> None:
        """Takes a new desired state and returns; the loop converges to it (the Kubernetes operator's way in)."""
        ClusterSpec.model_validate(spec.model_dump())  # same checks as at creation
        with self._spec_lock:
            self._set_spec(spec)

    def _set_spec(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.executor.snapshot_dir = spec.snapshot_dir
        self.save_spec(spec)
        self.converged = False
        self._wake.set()

    def drain(self, worker_id: str, timeout: float = 600.0, replace: bool = False) -> Iterator[str]:
        """Moves a worker's experts away and stops it; the pool shrinks by one (a drained spare is replaced).
        With `replace` the pool keeps its size: a new worker starts first and takes the experts (a spare, if
        one stands by), so that capacity never dips (a node's maintenance, a suspect GPU).

        The worker is named in the spec, in the same write that lowers the pool: a controller restarted
        mid-drain goes on with it, and a drain asked again (a call cut off by that restart) waits for it
        and drains nothing twice."""
        with self._spec_lock:
            observed = self.monitor.snapshot()
            again = worker_id in self.spec.drained
            if not again:
                if worker_id not in observed.serving:
                    raise ValueError(f"worker {worker_id!r} is not serving; serving: {sorted(observed.serving)}")
                shrink = worker_id in self._pool(observed) and not replace
                spec = self.spec.draining(worker_id, shrink=shrink, present=observed.workers)
                if spec.workers < spec.min_replicas:
                    raise ValueError(f"draining {worker_id} would leave fewer workers than min_replicas "
                                     f"({spec.min_replicas})")
                self._set_spec(spec)
        if again and worker_id not in observed.workers:
            yield f"{worker_id} has left the pool"
            return
        if again:
            yield f"{worker_id} is already leaving"
        else:
            yield f"replacing {worker_id}: a new worker takes its experts first" if replace else f"draining {worker_id}"
        yield from self._await_converged(timeout)

    def migrate(self, expert: ExpertKey, to: str, source: str | None = None) -> Iterator[str]:
        with self._plan_lock:
            steps = p.migrate(self.monitor.snapshot(), self.publisher.table.placement, expert, to, source,
                              self.spec.min_replicas)
            yield f"moving expert {expert} to {to}" if steps else f"expert {expert} is on {to} already: nothing to move"
            self.executor.run(steps)
        yield f"expert {expert} now on {list(self.publisher.table.placement[expert])} (epoch {self.publisher.table.epoch})"

    def _await_converged(self, timeout: float) -> Iterator[str]:
        self.converged = False
        self._wake.set()
        begin = time.monotonic()
        deadline = begin + timeout
        last = ""
        while time.monotonic() < deadline:
            observed = self.monitor.snapshot()
            pool = self._pool(observed)
            if self.converged and len(pool) == self.spec.workers:
                yield f"done: {self.spec.workers} workers serving at epoch {self.publisher.table.epoch}"
                return
            line = progress_line(self.spec, observed, self.publisher.table.epoch, time.monotonic() - begin,
                                 self.last_error)
            if line != last:
                yield line
                last = line
            time.sleep(0.1)
        raise TimeoutError(f"the pool did not converge within {timeout:.0f}s; last error: {self.last_error or 'none'}")

    def status(self, list_snapshots: bool = False) -> dict:
        """The pool as observed; the snapshot directory's list is up to LIST_EVERY_S old unless `list_snapshots`."""
        observed = self.monitor.snapshot()
        table = self.publisher.table
        load = _traffic(observed, table.placement)
        pool = self._pool(observed)
        workers = []
        for worker_id, obs in sorted(observed.workers.items()):
            state = obs.state.value
            if obs.state == WorkerState.SERVING and worker_id in self.spec.drained:
                state = "leaving"  # still answering while its experts move away
            elif obs.state == WorkerState.SERVING and worker_id not in pool:
                state = "standby"
            workers.append({
                "id": worker_id, "address": obs.address, "pid": obs.pid, "state": state,
                "experts": sorted([list(k) for k in obs.held]), "device": obs.device,
                "load": sum(obs.load.values()),
            })
        return {
            "name": self.spec.name, "endpoint": self.frontend.address if self.frontend else "", "epoch": table.epoch,
            "desired_workers": self.spec.workers, "min_replicas": self.spec.min_replicas, "workers": workers,
            "converged": self.converged, "last_error": self.last_error,
            "imbalance": imbalance(table.placement, load, pool) if load and pool else 1.0,
            "layer_imbalance": layer_imbalance(table.placement, load, pool) if load and pool else {},
            "frontends": sorted(self.publisher.frontends()),
            "dead": [w for w, o in observed.workers.items() if o.state == WorkerState.DEAD],
            "step": observed.step, "lowest_step": observed.lowest_step, "trainers": self.publisher.trainers(),
            "rollbacks": list(self.executor.rollbacks),
            "snapshot": str(self.last_snapshot.path) if self.last_snapshot else "", "restored": self.last_restore,
            "colocate": self.spec.colocate,
            "colocated": colocated_share(table.placement, pairs) if (pairs := self.pair_rates.rates()) else None,
            "snapshots": self.snapshots.get((self.monitor.stub(w) for w in pool[:2]), self.spec.snapshot_dir,
                                            now=list_snapshots),
        }


def _traffic(observed, table) -> dict[ExpertKey, float]:
    """Tokens/s per expert for the measures of balance ({} before any): an expert no token reached carries
    nothing (the planner's default, 1 token/s, would make a layer nobody uses look loaded)."""
    load = observed.load()
    return dict.fromkeys(table, 0.0) | load if load else {}
