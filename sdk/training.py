"""Training through a running cluster: the dense model here, the experts' weights, gradients
and optimizer state on the workers.

    session = TrainingSession("127.0.0.1:50151")              # the controller's address
    model = session.model("./tiny-qwen3").train()            # transformers' model, experts remote (RemoteMoE)
    opt = ExpertOptimizer(model, session, lr=1e-3, weight_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss
    loss = opt.step(closure)    # redone on the survivors if a worker dies mid-step; applied exactly once
    session.save(model, opt)    # the whole training state, at this step boundary

    session = TrainingSession("127.0.0.1:50151", resume_from="./snaps")   # every expert back to the save

    # data parallel, under torchrun: each trainer steps on its part of the batch, the pool once per step
    session = TrainingSession("127.0.0.1:50151", group=torch.distributed.group.WORLD)

A step runs from its first forward to the end of `step()`: the workers take the
gradients of step k only at version k - 1, and the update of step k applies
exactly once per expert (a repeat gets the stored acknowledgement). The session
watches the routing table as a trainer: the controller copies expert state only
between steps (it pauses, the session acknowledges at the step boundary).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import torch
from moecluster.frontend.dense_model import load_dense_model
from moecluster.frontend.dispatcher import Dispatcher, StepTag
from moecluster.frontend.remote_moe import RemoteMoE
from moecluster.frontend.routing import RoutingTable
from moecluster.frontend.step_gate import StepGate
from moecluster.frontend.table_watcher import TableWatcher, cluster_metadata
from moecluster.models.checkpoint import Checkpoint
from moecluster.models.devices import resolve_device
from moecluster.protos import controller_pb2, controller_pb2_grpc, worker_pb2
from moecluster.sdk import trainer_state
from moecluster.sdk.data_parallel import TrainerGroup
from moecluster.sdk.expert_optimizer import ExpertOptimizer  # noqa: F401  (its home was here: imports keep working)
from moecluster.sdk.step_outcomes import DONE, FAILED, TrainingError
from moecluster.wire import endpoints, retry, streaming
from moecluster.wire.tensors import decode
from torch import nn

log = logging.getLogger("moecluster.training")



class TrainingSession:
    def __init__(self, controller: str, *, timeout: float = 60.0, pause_timeout: float = 600.0,
                 progress: Callable[[str], None] = log.info, resume_from: str | Path | None = None, cluster: str = "",
                 group=None, resume_if_saved: bool = False):
        """`controller` is the controller's "host:port" (`moectl status -o json` shows it; on Kubernetes the
        operator's controller Service, with `cluster` = "NAMESPACE/NAME" of the MoECluster). With `resume_from`
        (a snapshot folder that `save` wrote, or a folder of them: the newest with the trainer's state; the path
        as the workers see it), every expert is rolled back to that snapshot first, and `model` and
        `ExpertOptimizer` start from its dense weights and optimizer state: training continues as if nothing
        after it had happened. With `resume_if_saved`, a `resume_from` folder that holds no save yet is no
        error: the session starts from the pool as it is (the first run of a job that restarts itself).

        With `group` (a torch.distributed process group of trainers, or a TrainerGroup of one, each making
        its own session with the same arguments), the trainers train data parallel: each steps on its own
        part of the batch, and every step of the group is one step of the pool (`sdk/data_parallel.py`).
        `save` and `ExpertOptimizer.step` (with a closure) are then collective: every member calls them."""
        self.group = group if isinstance(group, TrainerGroup) else TrainerGroup(group)
        self.id = f"trainer-{uuid.uuid4().hex[:12]}"
        self.timeout, self.pause_timeout, self.progress = timeout, pause_timeout, progress
        self.resumed: trainer_state.TrainerState | None = None
        self.dispatcher = Dispatcher(RoutingTable(0, {}), timeout=timeout)
        self.gate = StepGate()
        self.watcher = TableWatcher(controller, self.dispatcher, self.id, gate=self.gate if self.group.leader else None,
                                    cluster=cluster)  # the controller sees a group as one trainer: its leader
        self._metadata = cluster_metadata(cluster)
        self.watcher.start()
        self._channel = endpoints.internal_channel(controller)  # reconnects within a second to a restarted controller
        self._controller = controller_pb2_grpc.ControllerStub(self._channel)
        try:
            self._start(controller, resume_from, resume_if_saved)
        except Exception:  # a TrainingError, or the group broke: no watcher left behind
            self.close()
            raise
        self.attempt = 0
        self.resynced = 0  # replicas that missed an update and copied it from a peer
        self._contributions: dict[tuple[int, int], list[int]] = {}  # expert -> contribution ids of this attempt
        self._calls: dict[int, int] = {}  # layer -> backward calls in this attempt

    def _start(self, controller: str, resume_from: str | Path | None, resume_if_saved: bool) -> None:
        """The step to train, the session id the group's gradients go under, and a resume (by the leader)."""
        def saved_state(worker) -> trainer_state.TrainerState | None:
            try:
                return trainer_state.read(worker, Path(resume_from).absolute(), self.pause_timeout)
            except grpc.RpcError as err:
                if resume_if_saved and err.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise

        if self.group.worst(DONE if self.watcher.first_table.wait(self.timeout) else FAILED) != DONE:
            raise TrainingError(f"no routing table from the controller at {controller} within {self.timeout:.0f}s"
                                + (" (here or at another trainer of the group)" if self.group.size > 1 else ""))
        started: tuple | str = ""
        if self.group.leader:
            try:
                if resume_from is not None:
                    self.resumed = self._through_a_worker("cannot resume", saved_state)  # before anything changes
                if self.resumed is not None:
                    self._call_controller("Restore", controller_pb2.RestoreRequest(snapshot=str(self.resumed.path),
                                                                                   session=self.id))
                started = (self.id, self._committed_version() + 1, self.resumed and str(self.resumed.path))
            except TrainingError as err:
                started = str(err)
        started = self.group.from_leader(started)
        if isinstance(started, str):
            raise TrainingError(started if self.group.leader else f"the group's first trainer: {started}")
        self.session_id, self.step, resumed = started  # the step the next update applies
        if resumed and not self.group.leader:  # the experts are back at the save: the dense state from it too
            self.resumed = self._through_a_worker(
                "cannot resume", lambda w: trainer_state.read(w, Path(resumed), self.pause_timeout))
        if self.resumed is not None and self.step != self.resumed.step + 1:
            raise TrainingError(f"resumed from step {self.resumed.step}, but the experts are at {self.step - 1}")

    def model(self, checkpoint: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
        """transformers' model of `checkpoint` with its dense weights on `device` (cpu, cuda, cuda:N or
        auto), its experts remote and differentiable through this session; in train mode. A resumed
        session's dense weights are the snapshot's."""
        self.checkpoint = Checkpoint(checkpoint)
        model = load_dense_model(self.checkpoint, self.dispatcher, dtype, session=self, device=resolve_device(device))
        if self.resumed is not None:
            if not self.resumed.model:
                raise TrainingError("a resumed session's dense weights went into its first model(); make one model")
            try:
                model.load_state_dict(self.resumed.model)
            except RuntimeError as err:
                raise TrainingError(f"{self.resumed.path}: its dense weights do not fit {checkpoint}: {err}") from None
            self.resumed = dataclasses.replace(self.resumed, model={})  # in the model now: no second copy in memory
        return model.train()

    def save(self, model: nn.Module, optimizer: "ExpertOptimizer", directory: str | Path = "") -> Path:
        """Snapshots the whole training state at this step boundary: every expert's weights, AdamW moments
        and version (written by the workers, into DIRECTORY/step-NNNNNNNN/, default the cluster's snapshot
        directory) and, beside them, the dense model's weights and optimizer state (`trainer.pt`, sent to a
        worker: this process needs no access to the directory). Returns the folder, as the workers see it;
        `resume_from` takes it."""
        if self.gate.in_step:
            raise TrainingError("save() between steps: after ExpertOptimizer.step(), before the next forward")
        return Path(self._on_the_leader(lambda: self._save(model, optimizer, directory)))  # it saves for all

    def check_save_dir(self, directory: str | Path = "") -> None:
        """TrainingError unless DIRECTORY (default the cluster's snapshot directory) is a directory every worker
        can write into: found out before the first step, not at the first save. Collective, as `save`."""
        self._on_the_leader(lambda: self._call_controller(
            "Snapshot", controller_pb2.SnapshotRequest(directory=_absolute(directory), check_only=True)))

    def _on_the_leader(self, call: Callable[[], str]) -> str:
        """`call()` on the group's first trainer (the group's only one to the controller); its result, or the
        TrainingError it raised, on every trainer of the group."""
        outcome = ("", "")  # (result, error)
        if self.group.leader:
            try:
                outcome = (call(), "")
            except TrainingError as err:
                outcome = ("", str(err))
        result, error = self.group.from_leader(outcome)
        if error:
            raise TrainingError(error if self.group.leader else f"the group's first trainer: {error}")
        return result

    def save_what_survives(self, model: nn.Module, optimizer: "ExpertOptimizer", directory: str | Path = "") -> Path | None:
        """After the group broke (TrainerGroupBroken: a member died), the leader saves on its own, if the pool
        is at the step its dense state is at (no update half applied, none applied without its dense step),
        so that the restarted group redoes no step. The broken step is abandoned. None where it cannot:
        not the leader, or the pool is not there."""
        if not self.group.leader:
            return None
        self.gate.leave()
        try:
            if self._committed_version() != self.step - 1:
                self.progress(f"the pool is not at step {self.step - 1}, where this trainer's dense state is: not saving")
                return None
            return Path(self._save(model, optimizer, directory))
        except TrainingError as err:
            self.progress(f"could not save what the group had: {err}")
            return None

    def _save(self, model: nn.Module, optimizer: "ExpertOptimizer", directory: str | Path) -> str:
        folder = Path(self._call_controller("Snapshot", controller_pb2.SnapshotRequest(directory=_absolute(directory))))
        step = self.step - 1
        payload = trainer_state.encode(step, model, optimizer.dense)
        self._through_a_worker("save", lambda w: trainer_state.write(w, folder, step, payload, self.pause_timeout))
        self.progress(f"saved step {step} in {folder}")
        return str(folder)

    def _through_a_worker(self, what: str, call: Callable):
        """`call(stub)` on the first worker of the table that answers (any worker sees the snapshot directory)."""
        unavailable = []
        for worker_id in sorted(self.dispatcher.table.workers):
            try:
                return call(self.dispatcher.stub(worker_id))
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    detail = err.details() or err.code().name
                    if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the snapshot is of another step
                        detail += ": another trainer is stepping the pool"
                    raise TrainingError(f"{what}: {detail}") from None
                unavailable.append(f"{worker_id} ({err.code().name})")
            except ValueError as err:
                raise TrainingError(f"{what}: {err}") from None
        raise TrainingError(f"{what}: no worker answered: {unavailable or 'the table has none'}")

    def _call_controller(self, method: str, request) -> str:
        """Runs a streaming controller request (Snapshot, Restore) to its end; returns the path its last message
        names. Both are safe to repeat: a controller that dies mid-call is asked again once it is back."""
        call = getattr(self._controller, method)
        try:
            for progress in retry.stream_again_on_unavailable(
                    lambda left: call(request, timeout=left, metadata=self._metadata), timeout=self.pause_timeout,
                    on_retry=lambda err: self.progress(retry.asking_again(err))):
                if progress.done:
                    return progress.path
                self.progress(progress.message)
        except grpc.RpcError as err:
            raise TrainingError(f"{method.lower()}: {err.details() or err.code().name}") from None
        raise TrainingError(f"{method.lower()}: the controller's answer ended early")

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights as transformers names them, on the CPU: the dense ones from `model`,
        each layer's stacked experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)) read from a holder."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        for name, module in model.named_modules():
            if not isinstance(module, RemoteMoE):
                continue
            pairs = [self._export(module.layer, e) for e in range(module.num_experts)]
            state[f"{name}.gate_up_proj"] = torch.stack([g for g, _ in pairs])
            state[f"{name}.down_proj"] = torch.stack([d for _, d in pairs])
        return state

    def save_pretrained(self, model: nn.Module, out: str | Path) -> Path:
        """Writes the trained model (dense parts and experts gathered from the workers) as a
        Hugging Face checkpoint that `AutoModelForCausalLM.from_pretrained(out)` loads."""
        full = self.checkpoint.skeleton()
        full.to_empty(device="cpu")
        full.load_state_dict(self.state_dict(model), strict=False, assign=True)
        full.tie_weights()
        full.save_pretrained(out)
        return Path(out)

    def _export(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's weights from a holder. The pool keeps moving between steps (a rebalance, a scale): a
        holder that dropped the expert since the table was read, or died, is asked again from a newer table."""
        deadline = time.monotonic() + self.timeout
        while True:
            errors = []
            for worker_id in self.dispatcher.table.holders(layer, expert):
                try:
                    chunks = self.dispatcher.stub(worker_id).ExportExpert(worker_pb2.ExportExpertRequest(
                        expert=worker_pb2.ExpertKey(layer=layer, expert=expert)), timeout=self.timeout)
                    state = worker_pb2.ExpertState.FromString(streaming.join(chunks, limit_bytes=1 << 36))
                    return decode(state.gate_up_proj).clone(), decode(state.down_proj).clone()
                except grpc.RpcError as err:
                    errors.append(f"{worker_id}: {err.code().name}")
                    if err.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE):
                        deadline = 0  # not a moved expert: asking again would not help
                except (KeyError, ValueError):  # it left the table since the table was read
                    errors.append(f"{worker_id}: left the table")
            if time.monotonic() > deadline:
                raise TrainingError(f"expert ({layer}, {expert}) could not be read from any holder: "
                                    f"{errors or 'none in the table'}")
            time.sleep(0.1)

    # -- the step (called by RemoteMoE and ExpertOptimizer) --------------------------

    def begin_step(self) -> None:
        self.gate.enter(self.pause_timeout, self.progress)

    def begin_group_step(self) -> None:
        """A group's members start a step (or a new attempt at it) together, once its leader has entered
        the step gate: no copy of expert state starts until all of them have finished it."""
        if self.group.size == 1:
            return  # alone: the first forward enters the gate
        told: tuple[int, int] | str = ""
        if self.group.leader:
            try:
                self.begin_step()
                told = (self.step, self.attempt)
            except TimeoutError as err:
                told = str(err)
        told = self.group.from_leader(told)
        if isinstance(told, str):
            raise TrainingError(f"step {self.step}: {told}")
        if told != (self.step, self.attempt):
            raise TrainingError(f"this trainer is at step {self.step} attempt {self.attempt}, the group's first at "
                                f"step {told[0]} attempt {told[1]}: the members must call the same steps")

    def contribution(self, layer: int, experts: list[int]) -> StepTag:
        """The id of one backward call of `layer`, recorded for the experts it reaches; a group's members
        number theirs apart (call n of member r is n * size + r)."""
        number = self._calls.get(layer, 0)
        self._calls[layer] = number + 1
        tag = number * self.group.size + self.group.rank
        for e in experts:
            self._contributions.setdefault((layer, e), []).append(tag)
        return StepTag(self.step, self.session_id, self.attempt, tag)

    def new_attempt(self) -> None:
        """Gradients from now on replace what the workers kept for this step (zero_grad)."""
        if self._calls:
            self.attempt += 1
        self._contributions, self._calls = {}, {}
        if self.group.size == 1:  # a group's leader leaves the gate only when all members agree (`redo`)
            self.gate.leave()

    def redo(self) -> None:
        """The step is done again, by every member of a group alike: a new attempt, and a pending copy of
        expert state (a dead worker's replacement) goes through first."""
        self.attempt += 1
        self._contributions, self._calls = {}, {}
        self.gate.leave()

    def apply_update(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict:
        """Applies this step to every expert on every holder; returns {expert: acknowledgements} (in a group:
        the leader, which applies the members' gradients together; the others get {}). TrainingError when
        some expert has no holder that applied it."""
        merged: dict[tuple[int, int], list[int]] = {}
        for part in self.group.gather(self._contributions):
            for key, tags in part.items():
                merged.setdefault(key, []).extend(tags)
        acks, failure = {}, None
        if self.group.leader:
            try:
                acks = self._apply(merged, lr, betas, eps, weight_decay)
            except Exception as err:  # the other members must hear of it, not wait
                failure = err
        told = self.group.from_leader(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if told is not None:
            raise TrainingError(f"the group's first trainer: {told}")
        self.step += 1
        self.attempt = 0
        self._contributions, self._calls = {}, {}
        return acks

    def _apply(self, contributions: dict[tuple[int, int], list[int]], lr: float, betas: tuple[float, float],
               eps: float, weight_decay: float) -> dict:
        request = worker_pb2.ApplyUpdateRequest(
            step=self.step, session=self.session_id, attempt=self.attempt, average_over=self.group.size,
            adamw=worker_pb2.AdamW(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay))
        acks = self.dispatcher.apply_update(request, contributions)
        current = {k: [w for w, a in by_worker.items() if a is not None and a.version == self.step]
                   for k, by_worker in acks.items()}
        missing = sorted(k for k, holders in current.items() if not holders)
        if missing:
            raise TrainingError(f"step {self.step}: no holder of experts {missing[:8]} applied the update")
        digests = {k: {a.digest for a in by_worker.values() if a is not None and a.version == self.step and a.digest}
                   for k, by_worker in acks.items()}
        diverged = sorted(k for k, d in digests.items() if len(d) > 1)
        if diverged:
            log.warning("step %d: replicas of experts %s hold different weights", self.step, diverged[:8])
        self._resync({(k, w): current[k][0] for k, by_worker in acks.items() for w in by_worker if w not in current[k]})
        return acks

    def _resync(self, behind: dict[tuple[tuple[int, int], str], str]) -> None:
        """Replicas that did not apply the step (a lost gradient contribution, a refusal) would serve and
        train on older weights from now on: each copies the expert's new state from a holder that applied it
        (atomically, at this step boundary). One that cannot be reached is left to the controller."""
        unreachable: set[str] = set()
        for (key, worker_id), source in sorted(behind.items()):
            if worker_id in unreachable:
                continue
            try:
                request = worker_pb2.PullExpertRequest(expert=worker_pb2.ExpertKey(layer=key[0], expert=key[1]),
                                                       source=self.dispatcher.table.workers[source], refresh=True)
                self.dispatcher.stub(worker_id).PullExpert(request, timeout=self.timeout)
                self.resynced += 1
                log.warning("step %d: %s missed the update of expert %s; copied it from %s", self.step, worker_id, key,
                            source)
            except (grpc.RpcError, KeyError, ValueError) as err:
                unreachable.add(worker_id)  # dead or gone: the controller replaces it; no wait per expert
                log.warning("step %d: %s missed the update of expert %s and could not copy it from %s: %s", self.step,
                            worker_id, key, source, err.code().name if isinstance(err, grpc.RpcError) else err)

    def end_step(self) -> None:
        self.gate.leave()

    # -- helpers ---------------------------------------------------------------------

    def _committed_version(self) -> int:
        """The version every expert is at (the steps applied so far); TrainingError when they differ."""
        versions = self.versions()
        found = set(versions.values())
        if len(found) > 1:
            behind = sorted(k for k, v in versions.items() if v < max(found))
            raise TrainingError(f"experts are at different versions {sorted(found)} (behind: {behind[:8]}): an update "
                                "was cut off mid-way (the trainer stopped during it, or every holder of some expert "
                                "was lost): resume from a snapshot (TrainingSession(resume_from=...), `moectl train "
                                "--resume`) or roll the experts back with `moectl restore`")
        return found.pop() if found else 0

    def versions(self) -> dict[tuple[int, int], int]:
        """Each expert's version, from its holders (the lowest where replicas differ)."""
        table = self.dispatcher.table
        out: dict[tuple[int, int], int] = {}
        for worker_id in table.workers:
            stats = self.dispatcher.stub(worker_id).Stats(worker_pb2.StatsRequest(), timeout=self.timeout)
            for key, version in zip(stats.held, stats.versions):
                k = (key.layer, key.expert)
                if worker_id in table.holders(*k):
                    out[k] = min(version, out.get(k, version))
        return out

    def close(self) -> None:
        self.gate.leave()
        self.watcher.stop()
        self.dispatcher.close()
        self._channel.close()

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _absolute(directory: str | Path) -> str:
    """As the workers will see it ("" is the cluster's snapshot directory)."""
    return str(Path(directory).absolute()) if directory else ""
