"""The ExpertWorker gRPC service: Forward, Backward and updates, load/drop, peer-to-peer copies, stats.

The worker knows nothing of the controller's plans: it obeys epoch-tagged
commands, says what it holds, and rejects what it cannot answer correctly
without changing any state.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2
from moecluster.models.checkpoint import Checkpoint
from moecluster.observability.tracing import start_span, tracer
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import endpoints, streaming
from moecluster.wire.bulk import BulkSender
from moecluster.wire.tensors import WireError, encode
from moecluster.workers import snapshot_folders, trainer_files, validation
from moecluster.workers.batched_forward import forward_together
from moecluster.workers.expert_backward import expert_backward
from moecluster.workers.expert_store import ExpertStore
from moecluster.workers.expert_training import AdamW, ExpertTraining, TrainingRefused
from moecluster.workers.kernels import fused_experts
from moecluster.workers.peer_copy import PULL_DEADLINE_S, checked_state, fetch_expert
from moecluster.workers.request_batcher import RequestBatcher
from moecluster.workers.request_error import RequestError, invalid
from moecluster.workers.snapshot_files import ExpertState, write_expert
from moecluster.workers.snapshot_restore import SnapshotRestorer

SERVICE_NAME = "moecluster.worker.v1.ExpertWorker"
REJECTED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)  # what Stats.rejected counts
_TRACER = tracer(__name__)
DEFAULT_BATCH_TOKENS = 2048  # beyond this a call gains little from company; larger requests go alone, unqueued


class ExpertWorkerService(worker_pb2_grpc.ExpertWorkerServicer):
    def __init__(self, checkpoint: Checkpoint, *, worker_id: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", bulk: BulkSender | None = None,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, compute_threads: int = 2):
        """`batch_tokens`: the most tokens one kernel call computes for inference forwards that arrived
        together, on one of `compute_threads` threads (request_batcher.py); 0 computes each request alone,
        on the thread that received it."""
        self.checkpoint = checkpoint
        self.bulk = bulk  # None: peers copy through the ExportExpert stream only
        self.geometry = checkpoint.geometry
        self.worker_id = worker_id
        self.store = ExpertStore(self.geometry.num_experts, dtype, device)
        self.training = ExpertTraining(self.store)
        self.restorer = SnapshotRestorer(self.geometry, self.store, self.training)
        self.health = health.HealthServicer()
        self.epoch = 0
        self.draining = False
        self._lock = threading.Lock()
        self._stats: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0, 0, 0.0])  # tokens, calls, seconds
        self._requests = 0
        self._rejected = 0
        self.bytes_pulled = 0  # expert bytes copied from peers, for /metrics
        self._peers: dict[str, grpc.Channel] = {}
        if batch_tokens < 0:
            raise ValueError(f"batch_tokens is {batch_tokens}; 0 (each request alone) or more")
        self.batcher = None if not batch_tokens else RequestBatcher(
            self._compute_forwards, batch_tokens, threads=compute_threads, name=f"{worker_id}-forwards")
        self.set_serving(False)

    # -- lifecycle -------------------------------------------------------

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def warm_up(self) -> None:
        """One expert computation on dummy weights, so that the first real request does not pay
        for the kernel path's first-call set-up (thread pool, allocator): ~10 ms on a fresh worker."""
        g, like = self.geometry, {"dtype": self.store.dtype, "device": self.store.device}
        with torch.no_grad():
            fused_experts(torch.zeros(2, g.hidden, **like), torch.zeros(1, 2 * g.intermediate, g.hidden, **like),
                          torch.zeros(1, g.hidden, g.intermediate, **like),
                          torch.zeros(2, 1, dtype=torch.long, device=self.store.device), torch.ones(2, 1, **like))

    def load_from_checkpoint(self, keys: list[tuple[int, int]]) -> int:
        """Reads `keys` from the checkpoint (only their tensors) and holds them; returns bytes read."""
        return self._load(keys)[1]

    def _load(self, keys: list[tuple[int, int]], version: int = 0) -> tuple[list[tuple[int, int]], int]:
        """Reads the keys not yet held; returns (keys this call added, bytes read)."""
        todo = [k for k in dict.fromkeys(keys) if not self.store.holds(*k)]
        items = {k: self.checkpoint.read_expert(*k, dtype=self.store.dtype) for k in todo}
        added = self.store.add(items, version=version)
        self.training.forget(added)  # read from the checkpoint: untrained, whatever was here before
        return added, sum(g.numel() * g.element_size() + d.numel() * d.element_size() for g, d in items.values())

    def _observe_epoch(self, epoch: int) -> None:
        with self._lock:
            self.epoch = max(self.epoch, epoch)

    # -- RPCs ------------------------------------------------------------

    def Forward(self, request, context):
        return _answer(context, self, lambda: self._forward(request))

    def ForwardStream(self, request_iterator, context):
        limit = validation.MAX_TOKENS * self.geometry.hidden * 16
        yield from self._streamed(request_iterator, context, worker_pb2.ForwardRequest, self._forward, limit)

    def _streamed(self, request_iterator, context, message_type, handle: Callable, limit_bytes: int):
        """A unary handler behind a chunked stream (payloads above ~1 MiB): chunks in, chunks out."""
        def run():
            payload = streaming.join(request_iterator, limit_bytes=limit_bytes)
            try:
                request = message_type.FromString(payload)
            except DecodeError as err:
                raise invalid(f"stream payload of {len(payload)} bytes is not a {message_type.__name__}: {err}") from None
            return handle(request)

        response = _answer(context, self, run)
        yield from streaming.split(response.SerializeToString())

    def _forward(self, request: worker_pb2.ForwardRequest) -> worker_pb2.ForwardResponse:
        inputs = validation.check_forward(self.geometry, request)
        if request.step or self.batcher is None:
            output = self._compute_forwards(inputs.layer, [inputs], step=request.step)[0]
        else:  # inference: computed together with the requests for this layer that arrive meanwhile
            output = self.batcher.run(inputs.layer, inputs, rows=len(inputs.hidden_states))
        if isinstance(output, RequestError):
            raise output
        return worker_pb2.ForwardResponse(output=encode(output), epoch=self.epoch)

    def _compute_forwards(self, layer: int, requests: list[validation.ForwardInputs], step: int = 0) -> list:
        """One kernel call for the requests (outputs, or the RequestError refusing each one).
        A trainer's forward (step > 0) reads the weights of step - 1 only: the version is checked and
        the weights read under the training lock, so no update lands in between."""
        def check_version(inputs: validation.ForwardInputs) -> None:  # a replica that missed an update: ABORTED
            used = sorted({(layer, int(e)) for e in inputs.top_k_index[inputs.top_k_index >= 0].tolist()})
            self._refusing(lambda: self.training.check_version(used, step), grpc.StatusCode.ABORTED)

        start = time.perf_counter()
        with self.training.lock if step else contextlib.nullcontext(), self.store.reading(layer) as snapshot:
            outcomes = forward_together(snapshot, requests, self.epoch, device=self.store.device,
                                        dtype=self.store.dtype, check=check_version if step else None)
        seconds = time.perf_counter() - start
        answered = {i: int((r.top_k_index >= 0).sum()) for i, (r, out) in enumerate(zip(requests, outcomes))
                    if not isinstance(out, RequestError)}  # request -> its assignments
        total = max(sum(answered.values()), 1)
        for i, assignments in answered.items():  # the call's time shared by assignments
            self._record(layer, requests[i].top_k_index, seconds * assignments / total)
        return outcomes

    def _record(self, layer: int, top_k_index: torch.Tensor, seconds: float) -> None:
        """Tokens and time per expert; a call's time is shared out by token count."""
        ids, counts = torch.unique(top_k_index[top_k_index >= 0], return_counts=True)
        total = max(int(counts.sum()), 1)
        with self._lock:
            self._requests += 1
            for expert, count in zip(ids.tolist(), counts.tolist()):
                row = self._stats[(layer, expert)]
                row[0] += count
                row[1] += 1
                row[2] += seconds * count / total

    def Backward(self, request, context):
        return _answer(context, self, lambda: self._backward(request))

    def BackwardStream(self, request_iterator, context):
        limit = validation.MAX_TOKENS * self.geometry.hidden * 40  # hidden states and their gradient, 8 bytes each
        yield from self._streamed(request_iterator, context, worker_pb2.BackwardRequest, self._backward, limit)

    def _backward(self, request: worker_pb2.BackwardRequest) -> worker_pb2.BackwardResponse:
        inputs = validation.check_backward(self.geometry, request)
        fwd = inputs.forward
        with self.store.reading(fwd.layer) as snapshot:
            local = validation.check_held(snapshot, fwd, self.epoch)
            experts = sorted({int(e) for e in fwd.top_k_index[fwd.top_k_index >= 0].tolist()})
            if not experts:
                return worker_pb2.BackwardResponse(grad_hidden_states=encode(torch.zeros_like(fwd.hidden_states)),
                                                   grad_top_k_weights=encode(torch.zeros_like(fwd.top_k_weights)),
                                                   epoch=self.epoch)
            with self.training.lock:  # the version checked is the version the gradient is kept for
                self._refusing(lambda: self.training.check_step([(fwd.layer, e) for e in experts], request.step,
                                                                request.session, request.attempt))
                grad_x, grad_w, grads = expert_backward(snapshot, fwd.hidden_states, local, fwd.top_k_weights,
                                                        inputs.grad_output, inputs.primary)
                for expert, pair in grads.items():
                    self.training.contribute((fwd.layer, expert), request.step, request.session, request.attempt,
                                             request.contribution, pair)
        self._observe_epoch(request.epoch)
        return worker_pb2.BackwardResponse(grad_hidden_states=encode(grad_x), grad_top_k_weights=encode(grad_w),
                                           epoch=self.epoch)

    @staticmethod
    def _refusing(run: Callable, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION):
        try:
            return run()
        except TrainingRefused as err:
            raise RequestError(code, str(err)) from None

    def ApplyUpdate(self, request, context):
        def run():
            if request.step < 1 or not request.session:
                raise invalid(f"step {request.step}, session {request.session!r}: steps count from 1 and a session is named")
            hyper = AdamW(request.adamw.lr, request.adamw.beta1, request.adamw.beta2, request.adamw.eps,
                          request.adamw.weight_decay)
            if not (hyper.lr >= 0 and 0 <= hyper.beta1 < 1 and 0 <= hyper.beta2 < 1 and hyper.eps > 0
                    and hyper.weight_decay >= 0):
                raise invalid(f"adamw: {hyper} is out of range (lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0)")
            experts = {}
            for update in request.experts:
                key = validation.check_expert_key(self.geometry, update.expert)
                if not self.store.holds(*key):
                    raise self._not_held(key)
                experts[key] = list(update.contributions)
            acks = self._refusing(lambda: self.training.apply(request.step, request.session, request.attempt, hyper,
                                                              experts, request.average_over))
            self._observe_epoch(request.epoch)
            return worker_pb2.ApplyUpdateResponse(acks=[
                worker_pb2.UpdateAck(expert=_key(k), version=a.version, duplicate=a.duplicate, digest=a.digest)
                for k, a in sorted(acks.items())])

        return _answer(context, self, run)

    def WriteSnapshot(self, request, context):
        def run():
            keys = [validation.check_expert_key(self.geometry, k) for k in request.experts]
            if not request.directory or not os.path.isdir(os.path.dirname(os.path.abspath(request.directory))):
                raise invalid(f"directory: {request.directory!r} is not in a directory on this worker")
            os.makedirs(request.directory, exist_ok=True)
            files = []
            for key in keys:
                with self.training.lock:  # weights, moments and version of one committed step
                    gate_up, down, version = self._held(key)
                    moments = self.training.moments(key)
                    moments = tuple(m.clone() for m in moments) if moments is not None else None
                    state_id = self.store.state_id(*key)
                try:
                    info = write_expert(request.directory, ExpertState(*key, version, gate_up, down, moments))
                except OSError as err:
                    raise RequestError(grpc.StatusCode.INTERNAL, f"writing expert {key}: {err}") from None
                self.restorer.remember(key, info.digest, state_id)
                files.append(worker_pb2.SnapshotFile(expert=_key(key), file=info.file, version=info.version,
                                                     digest=info.digest, bytes=info.bytes))
            return worker_pb2.WriteSnapshotResponse(files=files)

        return _answer(context, self, run)

    def RestoreExperts(self, request, context):
        def run():
            response = self.restorer.restore(request)
            self._observe_epoch(request.epoch)
            return response

        return _answer(context, self, run)

    def SealSnapshot(self, request, context):
        return _answer(context, self, lambda: snapshot_folders.seal_request(request))

    def DiscardSnapshot(self, request, context):
        return _answer(context, self, lambda: snapshot_folders.discard_request(request))

    def ListSnapshots(self, request, context):
        return _answer(context, self, lambda: snapshot_folders.list_request(request))

    def WriteTrainerState(self, request_iterator, context):
        return _answer(context, self, lambda: trainer_files.write_request(request_iterator))

    def ReadTrainerState(self, request, context):
        opened = _answer(context, self, lambda: trainer_files.open_request(request))
        yield from trainer_files.parts(*opened)

    def LoadExperts(self, request, context):
        def run():
            keys = [validation.check_expert_key(self.geometry, k) for k in request.experts]
            if not keys:
                raise invalid("experts: empty list; name at least one (layer, expert)")
            loaded, read = self._load(keys, request.version)
            self._observe_epoch(request.epoch)
            return worker_pb2.LoadExpertsResponse(loaded=[_key(k) for k in loaded], bytes_read=read)

        return _answer(context, self, run)

    def DropExperts(self, request, context):
        def run():
            keys = [validation.check_expert_key(self.geometry, k) for k in request.experts]
            self._observe_epoch(request.epoch)
            with self.training.lock:
                dropped = self.store.drop(keys)
                self.training.forget(dropped)
            with self._lock:
                for key in dropped:
                    self._stats.pop(key, None)
            return worker_pb2.DropExpertsResponse(dropped=[_key(k) for k in dropped])

        return _answer(context, self, run)

    def ExportExpert(self, request, context):
        def run():
            key = validation.check_expert_key(self.geometry, request.expert)
            with self.training.lock:
                gate_up, down, version = self._held(key)
                if request.HasField("newer_than") and version <= request.newer_than:
                    return worker_pb2.ExpertState(expert=_key(key), version=version)  # nothing newer: no tensors
                moments = self.training.moments(key) or ()
                return worker_pb2.ExpertState(expert=_key(key), gate_up_proj=encode(gate_up), down_proj=encode(down),
                                              version=version, optimizer_state=[encode(m) for m in moments])

        state = _answer(context, self, run)
        yield from streaming.split(state.SerializeToString())

    def OfferExpert(self, request, context):
        def run():
            key = validation.check_expert_key(self.geometry, request.expert)
            if self.bulk is None:
                raise RequestError(grpc.StatusCode.UNIMPLEMENTED, "this worker has no bulk side channel; use ExportExpert")
            # Send the held slot itself, no copy: pinned until the transfer is over (the bulk sender
            # releases it; at the latest when the offer expires).
            with self.training.lock:  # weights, moments and version of one committed step
                try:
                    gate_up, down, release = self.store.pin(*key)
                except KeyError:
                    raise self._not_held(key) from None
                version = self.store.version(*key)
                if request.HasField("newer_than") and version <= request.newer_than:
                    release()
                    return worker_pb2.ExpertOffer(expert=_key(key), version=version)  # nothing newer: no ticket
                moments = [m.clone() for m in self.training.moments(key) or ()]  # updated in place: copies
            ticket = self.bulk.offer([gate_up, down, *moments], copy=False, release=release)
            return worker_pb2.ExpertOffer(expert=_key(key), version=version, ticket=ticket)

        return _answer(context, self, run)

    def _peer(self, address: str) -> worker_pb2_grpc.ExpertWorkerStub:
        """A stub on a kept channel to a peer: a pull pays no connection set-up."""
        with self._lock:
            if address not in self._peers:
                self._peers[address] = endpoints.internal_channel(address, options=streaming.GRPC_OPTIONS)
            return worker_pb2_grpc.ExpertWorkerStub(self._peers[address])

    def close(self) -> None:
        if self.batcher:
            self.batcher.close()
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for channel in peers:
            channel.close()

    def _refresh(self, key: tuple[int, int], source: str, expert: worker_pb2.ExpertKey, limit: int,
                 deadline: float) -> int:
        """Replaces a held copy with the source's when the source's is newer (copy on write: readers keep
        the old weights whole); returns the bytes copied, 0 when ours is as new (the source sends none then)."""
        sent, tensors, version, size = fetch_expert(self._peer(source), source, expert, limit, deadline,
                                                     newer_than=self.store.version(*key))
        if not tensors:
            return 0
        gate_up, down, moments = checked_state(self.geometry, key, sent, tensors)
        with self.training.lock:
            if version <= self.store.version(*key):
                return 0
            self.store.replace(*key, gate_up, down, version)
            self.training.adopt(key, moments)
        with self._lock:
            self.bytes_pulled += size
        return size

    def _receive_into(self, reservation) -> list[torch.Tensor] | None:
        """The slot itself where the side channel can write into it (host memory); else None: the bytes
        land in host memory and are copied onto the device."""
        return [reservation.gate_up, reservation.down] if self.store.device.type == "cpu" else None

    def _held(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        try:
            gate_up, down = self.store.get(*key)
            return gate_up, down, self.store.version(*key)
        except KeyError:
            raise self._not_held(key) from None

    def _not_held(self, key: tuple[int, int]) -> RequestError:
        return RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"expert {key} is not on this worker (worker epoch {self.epoch})")

    def PullExpert(self, request, context):
        def run():
            key = validation.check_expert_key(self.geometry, request.expert)
            if not request.source:
                raise invalid("source: empty; give the host:port of a worker that holds the expert")
            start = time.perf_counter()
            remaining = context.time_remaining()  # never outlive the caller's deadline
            deadline = PULL_DEADLINE_S if remaining is None else min(PULL_DEADLINE_S, remaining)
            g = self.geometry
            limit = g.hidden * g.intermediate * 3 * 8 * 3 + 4096  # weights and two moments, 8-byte worst case
            if self.store.holds(*key):
                size = self._refresh(key, request.source, request.expert, limit, deadline) if request.refresh else 0
                self._observe_epoch(request.epoch)
                return worker_pb2.PullExpertResponse(bytes=size, seconds=time.perf_counter() - start if size else 0.0)
            shapes = ((2 * g.intermediate, g.hidden), (g.hidden, g.intermediate))
            try:  # receive straight into a slot readers cannot see yet; a concurrent pull of it is waited for
                reservation = self.store.reserve(*key, shapes, wait_s=deadline)
            except TimeoutError as err:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(err)) from None
            if reservation is None:  # the other pull brought it
                self._observe_epoch(request.epoch)
                return worker_pb2.PullExpertResponse(bytes=0, seconds=time.perf_counter() - start)
            try:
                sent, tensors, version, size = fetch_expert(self._peer(request.source), request.source, request.expert,
                                                             limit, deadline, into=self._receive_into(reservation))
                gate_up, down, moments = checked_state(self.geometry, key, sent, tensors)
                if gate_up.data_ptr() != reservation.gate_up.data_ptr():  # came another way (stream, other dtype)
                    reservation.gate_up.copy_(gate_up)
                    reservation.down.copy_(down)
            except BaseException:
                self.store.abort(reservation)
                raise
            with self.training.lock:
                self.training.adopt(key, moments)
                self.store.commit(reservation, version)
            with self._lock:
                self.bytes_pulled += size
            self._observe_epoch(request.epoch)  # only a pull that succeeded moves the epoch
            return worker_pb2.PullExpertResponse(bytes=size, seconds=time.perf_counter() - start)

        attributes = {"layer": request.expert.layer, "expert": request.expert.expert, "source": request.source}
        with start_span(_TRACER, "expert.pull", attributes) as span:
            response = _answer(context, self, run)
            span.set_attribute("bytes", response.bytes)
            return response

    def Stats(self, request, context):
        held = self.store.held()
        with self._lock:
            experts = [
                worker_pb2.ExpertStats(expert=_key(k), tokens=int(v[0]), calls=int(v[1]), seconds=v[2])
                for k, v in sorted(self._stats.items())
            ]
            requests, rejected = self._requests, self._rejected
        return worker_pb2.StatsResponse(
            worker_id=self.worker_id,
            pid=os.getpid(),
            epoch=self.epoch,
            draining=self.draining,
            held=[_key(k) for k in held],
            versions=[self.store.version(*k) if self.store.holds(*k) else 0 for k in held],
            experts=experts,
            requests=requests,
            rejected=rejected,
            forward_batches=self.batcher.calls if self.batcher else 0,
            batched_requests=self.batcher.requests if self.batcher else 0,
            moe_layers=self.checkpoint.geometry.moe_layers,
            num_experts=self.checkpoint.geometry.num_experts,
            device=str(self.store.device),
        )

    def Drain(self, request, context):
        self.draining = True
        self.set_serving(False)
        return worker_pb2.DrainResponse()

    def count_rejected(self) -> None:
        with self._lock:
            self._rejected += 1


def _answer(context: grpc.ServicerContext, service: ExpertWorkerService, run: Callable):
    """Runs a handler; RequestError and WireError become the status they name, state untouched."""
    try:
        return run()
    except RequestError as err:
        if err.code in REJECTED_CODES:  # a peer's failure during a pull is not the caller's fault
            service.count_rejected()
        context.abort(err.code, err.message)
    except WireError as err:
        service.count_rejected()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


def _key(key: tuple[int, int]) -> worker_pb2.ExpertKey:
    return worker_pb2.ExpertKey(layer=key[0], expert=key[1])


def expert_keys(spec: str) -> list[tuple[int, int]]:
    """'0:0-3,1:5' -> [(0,0),(0,1),(0,2),(0,3),(1,5)]; for command lines."""
    keys = []
    for part in filter(None, spec.split(",")):
        try:
            layer, experts = part.split(":")
            low, _, high = experts.partition("-")
            keys += [(int(layer), e) for e in range(int(low), int(high or low) + 1)]
        except ValueError:
            raise ValueError(f"bad expert spec {part!r}; use LAYER:EXPERT or LAYER:FIRST-LAST, comma separated") from None
    return keys

