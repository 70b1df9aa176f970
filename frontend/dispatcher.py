"""Sends one MoE layer's tokens to the workers that hold their experts (and, in training, their gradients).

One RPC per worker per layer, all in flight at once; each worker gets only the
tokens that need one of its experts (deduplicated), with -1 in the slots another
worker serves. A replica is picked per expert by the load its worker would then carry,
crediting tokens whose other experts that worker holds (see `_assign`). When a worker
fails (UNAVAILABLE, deadline) or says it no longer holds an expert
(FAILED_PRECONDITION), only its share is sent again, to another replica, so a
request fails only when some expert it needs has no live replica left.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import defaultdict
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moecluster.frontend.coactivation import CoActivation
from moecluster.frontend.routing import RoutingTable
from moecluster.observability.tracing import start_span, tracer
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import endpoints, streaming
from moecluster.wire.tensors import decode, encode

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
SUSPECT_SECONDS = 2.0  # a worker that failed is tried last for this long
CONNECT_TIMEOUT_S = 10.0
_TRACER = tracer(__name__)
log = logging.getLogger("moecluster.frontend")


@dataclass(frozen=True)
class StepTag:
    """Which update a backward call's gradient belongs to, and the call's id within it."""

    step: int
    session: str
    attempt: int
    contribution: int


class ExpertUnavailableError(RuntimeError):
    """Some expert a request needs has no live replica."""


class DispatchError(RuntimeError):
    """A worker refused a request as malformed: a bug on the sending side."""


class Dispatcher:
    def __init__(self, table: RoutingTable, *, timeout: float = 30.0, stale_wait: float = 2.0):
        self.timeout = timeout
        self.stale_wait = stale_wait  # how long FAILED_PRECONDITION waits for a newer table
        self._table = table
        self._lock = threading.Lock()
        self._newer = threading.Condition(self._lock)
        self._inflight: dict[str, set] = defaultdict(set)  # worker id -> cancel callables of calls in flight
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.ExpertWorkerStub] = {}
        self._outstanding: dict[str, int] = defaultdict(int)  # tokens in flight per worker id
        self._suspect_until: dict[str, float] = {}
        self._tiebreak = itertools.count()
        self._pool = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="dispatch-stream")
        self.retries = 0
        self.wire_bytes = 0  # serialized request + response bytes, for benchmarks
        self.tokens_in = 0  # tokens forwarded, summed over layers
        self.tokens_sent = 0  # of those, sent to a worker, once per worker: tokens_sent / tokens_in is the fan-out
        self.coactivation = CoActivation()  # experts tokens pick together, reported to the controller

    @property
    def table(self) -> RoutingTable:
        return self._table

    def update(self, table: RoutingTable) -> None:
        """Routes by `table` from now on (ignored when older than the current one)."""
        with self._lock:
            if table.epoch < self._table.epoch:
                return
            self._table = table
            self._newer.notify_all()
            gone = [cancel for w, calls in self._inflight.items() if w not in table.workers for cancel in calls]
            addresses = set(table.workers.values())
            departed = [self._channels.pop(a) for a in list(self._channels) if a not in addresses]
            for address in [a for a in self._stubs if a not in addresses]:
                del self._stubs[address]
        for cancel in gone:
            cancel()
        for channel in departed:  # its worker left the table: a call still holding its stub fails over (see _send)
            channel.close()
        for address in table.workers.values():  # connect to new workers now, not on their first request
            self._stub(address)

    def wait_newer(self, epoch: int, timeout: float) -> bool:
        """Blocks until the table's epoch passes `epoch`; False on timeout."""
        with self._lock:
            return self._newer.wait_for(lambda: self._table.epoch > epoch, timeout)

    def outstanding(self) -> dict[str, int]:
        """Tokens in flight per worker id (each worker of the table, 0 when idle): the load this frontend puts on it."""
        with self._lock:
            return {**dict.fromkeys(self._table.workers, 0), **{w: n for w, n in self._outstanding.items() if n}}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._pool.shutdown(wait=False)

    def forward(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, step: int = 0) -> torch.Tensor:
        """(T, H), (T, K) ids, (T, K) weights -> (T, H) sum of weighted expert outputs.

        step > 0 (a trainer's forward): only replicas at version step - 1 answer; one that missed an
        update refuses (ABORTED) and its share goes to another replica."""
        output = torch.zeros_like(hidden_states)
        seen = {"workers": set(), "retries": 0}  # for the span: workers called and shares sent again
        self.coactivation.record(layer, top_k_index)
        with self._lock:
            self.tokens_in += int(hidden_states.shape[0])
        with start_span(_TRACER, "moe.dispatch", {"layer": layer, "tokens": int(hidden_states.shape[0])}) as span:
            try:
                self._dispatch(layer, hidden_states, top_k_index, top_k_weights, output, set(), seen, step)
            finally:
                span.set_attributes({"workers": len(seen["workers"]), "retries": seen["retries"]})
        return output

    def backward(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 grad_output: torch.Tensor, tag: StepTag) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: -> (dL/dhidden (T, H), dL/dtop_k_weights (T, K)).

        Every live holder of an expert gets all of its tokens (each replica keeps the same weight
        gradient, so all apply the same update); one of them, the primary, returns the input
        gradients. When a primary fails, its experts are asked of the other holders again: the
        contribution id keeps a gradient from being counted twice where it already arrived."""
        grad_x, grad_w = torch.zeros_like(hidden_states), torch.zeros_like(top_k_weights)
        with start_span(_TRACER, "moe.backward", {"layer": layer, "tokens": int(hidden_states.shape[0])}):
            self._backward(layer, hidden_states, top_k_index, top_k_weights, grad_output, tag, grad_x, grad_w, set())
        return grad_x, grad_w

    def _backward(self, layer, hidden, index, weights, grad, tag: StepTag, grad_x, grad_w, excluded: set[str],
                  fresh_tables: int = 2) -> None:
        table = self._table
        try:
            primary = self._assign(table, layer, index, excluded)
        except ExpertUnavailableError:
            if fresh_tables and self.wait_newer(table.epoch, self.stale_wait):
                self._backward(layer, hidden, index, weights, grad, tag, grad_x, grad_w, set(), fresh_tables - 1)
                return
            raise
        in_use = torch.unique(index[index >= 0]).tolist()
        pending = []
        for worker_id in sorted({w for e in in_use for w in table.holders(layer, e) if w not in excluded}):
            mine = [e for e in in_use if worker_id in table.holders(layer, e)]
            mask = torch.isin(index, torch.tensor(mine))
            rows = mask.any(dim=1).nonzero().squeeze(1)
            lead = primary.get(worker_id, torch.zeros_like(mask))
            sub_index = torch.where(mask, index, -1)[rows].to(torch.int32)
            request = worker_pb2.BackwardRequest(
                layer=layer, hidden_states=encode(hidden[rows]), top_k_index=encode(sub_index),
                top_k_weights=encode(weights[rows].to(hidden.dtype)), grad_output=encode(grad[rows].to(hidden.dtype)),
                primary=encode(lead[rows]), step=tag.step, session=tag.session, attempt=tag.attempt,
                contribution=tag.contribution, epoch=table.epoch)
            call, _ = self._send(table.workers[worker_id], request)
            pending.append((worker_id, rows, lead, call))
        redo = []
        for worker_id, rows, lead, call in pending:
            try:
                response = call()
                grad_x.index_add_(0, rows, decode(response.grad_hidden_states).to(grad_x.dtype))
                grad_w.index_add_(0, rows, decode(response.grad_top_k_weights).to(grad_w.dtype))
            except (grpc.RpcError, grpc.FutureCancelledError, futures.CancelledError) as err:
                code = err.code() if isinstance(err, grpc.RpcError) else grpc.StatusCode.CANCELLED
                if code not in RETRYABLE:
                    raise DispatchError(f"worker {worker_id} refused the backward of layer {layer}: {code.name}: "
                                        f"{err.details()}") from None
                self._suspect_until[worker_id] = time.monotonic() + SUSPECT_SECONDS
                if lead.any():  # its input gradients are missing: ask the other holders
                    redo.append((worker_id, lead))
        for worker_id, lead in redo:
            self.retries += 1
            rows = lead.any(dim=1).nonzero().squeeze(1)
            part_x = torch.zeros((rows.numel(), hidden.shape[1]), dtype=grad_x.dtype)
            part_w = torch.zeros((rows.numel(), index.shape[1]), dtype=grad_w.dtype)
            self._backward(layer, hidden[rows], torch.where(lead, index, -1)[rows], weights[rows], grad[rows], tag,
                           part_x, part_w, excluded | {worker_id}, fresh_tables)
            grad_x.index_add_(0, rows, part_x)
            grad_w.index_add_(0, rows, part_w)

    def apply_update(self, request: worker_pb2.ApplyUpdateRequest,
                     contributions: dict[tuple[int, int], list[int]]
                     ) -> dict[tuple[int, int], dict[str, worker_pb2.UpdateAck | None]]:
        """Sends the step's update to every holder of every expert in the table (each gets its own
        experts' contribution lists) -> {expert: {holder: its acknowledgement, None where it is gone or
        refused (logged)}}; the caller checks every expert has an answer."""
        table = self._table
        calls = {}
        for worker_id, address in table.workers.items():
            mine = table.experts_of(worker_id)
            if not mine:
                continue
            message = worker_pb2.ApplyUpdateRequest()
            message.CopyFrom(request)
            message.epoch = table.epoch
            message.experts.extend(worker_pb2.ExpertUpdate(expert=worker_pb2.ExpertKey(layer=l, expert=e),
                                                           contributions=contributions.get((l, e), [])) for l, e in mine)
            try:
                calls[worker_id] = self._stub(address).ApplyUpdate.future(message, timeout=self.timeout)
            except ValueError:  # left the table since `table` was read: its channel is closed
                log.warning("update of step %d not sent to %s: it left the table", request.step, worker_id)
        acks: dict[tuple[int, int], dict[str, worker_pb2.UpdateAck | None]] = {
            k: dict.fromkeys(holders) for k, holders in table.replicas.items()}
        for worker_id, call in calls.items():
            try:
                for ack in call.result().acks:
                    acks[(ack.expert.layer, ack.expert.expert)][worker_id] = ack
            except grpc.RpcError as err:
                log.warning("update of step %d not applied on %s: %s: %s", request.step, worker_id, err.code().name,
                            err.details())
        return acks

    # ----------------------------------------------------------------

    def _dispatch(self, layer, hidden, index, weights, output, excluded: set[str], seen: dict, step: int,
                  fresh_tables: int = 2) -> None:
        table = self._table
        try:
            plan = self._assign(table, layer, index, excluded)
        except ExpertUnavailableError:
            # Every copy we know of failed: the controller may have moved the expert under a table we
            # have not received yet. Wait for it and start over with it, a bounded number of times.
            if fresh_tables and self.wait_newer(table.epoch, self.stale_wait):
                self._dispatch(layer, hidden, index, weights, output, set(), seen, step, fresh_tables - 1)
                return
            raise
        seen["workers"].update(plan)
        pending = []
        for worker_id, mask in plan.items():
            rows = mask.any(dim=1).nonzero().squeeze(1)
            sub_index = torch.where(mask, index, -1)[rows]
            request = worker_pb2.ForwardRequest(
                layer=layer, hidden_states=encode(hidden[rows]), top_k_index=encode(sub_index.to(torch.int32)),
                top_k_weights=encode(weights[rows].to(hidden.dtype)), epoch=table.epoch, step=step)
            tokens = int(rows.numel())
            call, cancel = self._send(table.workers[worker_id], request)
            with self._lock:
                self._outstanding[worker_id] += tokens
                self._inflight[worker_id].add(cancel)
                self.tokens_sent += tokens
            pending.append((worker_id, rows, sub_index, tokens, call, cancel))
        failed: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for worker_id, rows, sub_index, tokens, call, cancel in pending:
            try:
                response = call()
                output.index_add_(0, rows, decode(response.output).to(output.dtype))
            except (grpc.RpcError, grpc.FutureCancelledError, futures.CancelledError) as err:
                code = err.code() if isinstance(err, grpc.RpcError) else grpc.StatusCode.CANCELLED
                if code not in RETRYABLE:
                    raise DispatchError(f"worker {worker_id} refused layer {layer}: {code.name}: {err.details()}") from None
                failed.append((worker_id, rows, sub_index))
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    self.wait_newer(table.epoch, self.stale_wait)  # the controller moved it: take the new table
                else:
                    self._suspect_until[worker_id] = time.monotonic() + SUSPECT_SECONDS
            finally:
                with self._lock:
                    self._outstanding[worker_id] -= tokens
                    self._inflight[worker_id].discard(cancel)
        for worker_id, rows, sub_index in failed:
            self.retries += 1
            seen["retries"] += 1
            partial = torch.zeros((rows.numel(), hidden.shape[1]), dtype=hidden.dtype)
            self._dispatch(layer, hidden[rows], sub_index, weights[rows], partial, excluded | {worker_id}, seen,
                           step, fresh_tables)
            output.index_add_(0, rows, partial)

    def _assign(self, table: RoutingTable, layer: int, index: torch.Tensor, excluded: set[str]) -> dict[str, torch.Tensor]:
        """Picks one replica per expert in use -> {worker id: (T, K) bool mask of the slots it serves}.

        Heaviest expert first, each to the live replica that would then carry the fewest tokens: those in
        flight there, plus this call's (a token counted once per worker), less this expert's tokens that
        also picked another expert the replica holds. So experts a token picked that share a worker (what
        `--colocate` arranges) are sent there together, one send instead of two, while load still decides."""
        now = time.monotonic()
        experts, counts = torch.unique(index[index >= 0], return_counts=True)
        live: dict[int, list[str]] = {}
        for expert in experts.tolist():
            live[expert] = [w for w in table.holders(layer, expert) if w not in excluded]
            if not live[expert]:
                raise ExpertUnavailableError(
                    f"expert {expert} of layer {layer} has no live replica (tried {sorted(excluded) or 'none'}, "
                    f"table epoch {table.epoch})")
        choices = {w for workers in live.values() if len(workers) > 1 for w in workers}
        held = {w: torch.isin(index, torch.tensor([e for e, ws in live.items() if w in ws])).sum(dim=1)
                for w in choices}  # per token: how many of its picks the worker holds
        sent: dict[str, torch.Tensor] = {}  # tokens each chosen worker gets so far
        chosen: dict[int, str] = {}
        for _, expert in sorted(zip((-counts).tolist(), experts.tolist())):
            uses = (index == expert).any(dim=1)
            workers = live[expert]
            if len(workers) > 1:
                def after(w: str) -> int:
                    mine = sent.get(w)
                    carried = int(uses.sum()) if mine is None else int((mine | uses).sum())
                    return carried - int((uses & (held[w] >= 2)).sum())
                with self._lock:
                    worker = min(workers, key=lambda w: (self._suspect_until.get(w, 0) > now,
                                                         self._outstanding[w] + after(w),
                                                         next(self._tiebreak) % len(workers)))
            else:
                worker = workers[0]
            chosen[expert] = worker
            sent[worker] = uses if worker not in sent else sent[worker] | uses
        owner = {}
        for expert, worker_id in chosen.items():
            owner.setdefault(worker_id, []).append(expert)
        return {w: torch.isin(index, torch.tensor(experts)) for w, experts in owner.items()}

    def _send(self, address: str, request: worker_pb2.ForwardRequest | worker_pb2.BackwardRequest):
        """Starts the RPC (Forward or Backward, streamed when large) now; returns (wait for the answer, cancel it)."""
        stub = self._stub(address)
        size = request.ByteSize()
        method, response_type = _METHODS[type(request)]
        if not streaming.needs_streaming(size):
            try:
                future = getattr(stub, method).future(request, timeout=self.timeout)
            except ValueError:  # "closed channel": the worker left the table under us; retried like a cancel
                return _cancelled, lambda: None

            def wait():
                response = future.result()
                self.wire_bytes += size + response.ByteSize()
                return response
            return wait, future.cancel

        try:
            chunks = getattr(stub, method + "Stream")(streaming.split(request.SerializeToString()), timeout=self.timeout)
        except ValueError:
            return _cancelled, lambda: None

        def stream():
            payload = streaming.join(chunks, limit_bytes=1 << 34)
            self.wire_bytes += size + len(payload)
            return response_type.FromString(payload)

        return self._pool.submit(stream).result, chunks.cancel

    def stub(self, worker_id: str) -> worker_pb2_grpc.ExpertWorkerStub:
        """A stub for a worker of the current table (KeyError when it has none)."""
        return self._stub(self._table.workers[worker_id])

    def _stub(self, address: str) -> worker_pb2_grpc.ExpertWorkerStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = endpoints.internal_channel(address, options=streaming.GRPC_OPTIONS)
                _connect_in_background(channel)
                self._channels[address] = channel
                stub = self._stubs[address] = worker_pb2_grpc.ExpertWorkerStub(channel)
            return stub


def _cancelled():
    raise futures.CancelledError()


_METHODS = {worker_pb2.ForwardRequest: ("Forward", worker_pb2.ForwardResponse),
            worker_pb2.BackwardRequest: ("Backward", worker_pb2.BackwardResponse)}


def _connect_in_background(channel: grpc.Channel) -> None:
    """Starts connecting now, not on the first request: a health check nobody waits for. (A connectivity
    subscription would leave gRPC's polling thread watching the channel, which races its close.)"""
    health_pb2_grpc.HealthStub(channel).Check.future(health_pb2.HealthCheckRequest(), timeout=CONNECT_TIMEOUT_S)
