"""Copying an expert from a peer worker: its weights, AdamW moments and version, checked.

The bytes come over the peer's bulk side channel (`OfferExpert` hands out a ticket for
`wire.bulk`), or through the chunked `ExportExpert` stream where the peer has no side
channel or its port cannot be reached.  What arrives is checked against this model's
shapes before anything in the store changes.
"""

from __future__ import annotations

import logging

import grpc
import torch
from google.protobuf.message import DecodeError
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import bulk, streaming
from moecluster.wire.tensors import DTYPES, NAMES, WireError, decode
from moecluster.workers.request_error import RequestError

PULL_DEADLINE_S = 120.0
_LOG = logging.getLogger(__name__)


def fetch_expert(stub: worker_pb2_grpc.ExpertWorkerStub, source: str, key: worker_pb2.ExpertKey, limit_bytes: int,
                 timeout: float = PULL_DEADLINE_S, into: list[torch.Tensor] | None = None,
                 newer_than: int | None = None) -> tuple[worker_pb2.ExpertKey, list[torch.Tensor], int, int]:
    """Copies an expert from a peer: (the key it sent, [gate_up, down (, 4 moments)], version, bytes);
    no tensors (and 0 bytes) when `newer_than` is given and the peer's version is not above it.

    The bytes come over the peer's bulk side channel (OfferExpert's ticket), straight
    into `into` when the ticket's dtypes and shapes match it; a peer without a side
    channel, or one whose bulk port cannot be reached, is read through the
    ExportExpert stream instead.  Errors say which peer failed and how."""
    request = worker_pb2.ExportExpertRequest(expert=key, newer_than=newer_than)
    try:
        try:
            offer = stub.OfferExpert(request, timeout=timeout)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            offer = None  # a peer without the side channel
        if offer is not None and not offer.HasField("ticket"):
            return offer.expert, [], offer.version, 0  # not newer than ours
        if offer is not None:
            host = source.rsplit(":", 1)[0].strip("[]")
            sent = [(m.dtype, tuple(m.shape)) for m in offer.ticket.tensors]
            matches = into is not None and sent[:len(into)] == [(NAMES.get(t.dtype), tuple(t.shape)) for t in into]
            if matches:  # the moments of a trained expert come after the weights: fresh buffers
                into = into + [torch.empty(shape, dtype=DTYPES[dtype]) for dtype, shape in sent[len(into):]]
            try:
                tensors = bulk.receive(host, offer.ticket, timeout=timeout, limit_bytes=limit_bytes,
                                       into=into if matches else None)
                return offer.expert, tensors, offer.version, offer.ticket.nbytes
            except OSError as err:  # could not connect; a transfer that broke off is a WireError (data loss)
                _LOG.warning("bulk side channel of %s unreachable (%s); copying through the gRPC stream", source, err)
        chunks = stub.ExportExpert(request, timeout=timeout)
        payload = streaming.join(chunks, limit_bytes=limit_bytes)
        state = worker_pb2.ExpertState.FromString(payload)
        if not state.HasField("gate_up_proj"):
            return state.expert, [], state.version, 0  # not newer than ours
        tensors = [decode(state.gate_up_proj, name="gate_up_proj").clone(), decode(state.down_proj, name="down_proj").clone()]
        tensors += [decode(m, name="optimizer_state").clone() for m in state.optimizer_state]
        return state.expert, tensors, state.version, len(payload)
    except grpc.RpcError as err:
        code = err.code() if err.code() != grpc.StatusCode.INVALID_ARGUMENT else grpc.StatusCode.FAILED_PRECONDITION
        raise RequestError(code, f"pull from {source} failed: {err.code().name}: {err.details()}") from None
    except WireError as err:
        raise RequestError(grpc.StatusCode.DATA_LOSS, f"pull from {source}: {err}") from None
    except DecodeError as err:
        raise RequestError(grpc.StatusCode.DATA_LOSS, f"pull from {source}: not an ExpertState: {err}") from None


def checked_state(geometry, key: tuple[int, int], sent: worker_pb2.ExpertKey, tensors: list[torch.Tensor]):
    """The pulled (gate_up, down, moments or None), if they are the expert asked for with this model's shapes."""
    if (sent.layer, sent.expert) != key:
        raise RequestError(grpc.StatusCode.DATA_LOSS, f"peer sent expert {(sent.layer, sent.expert)}, asked for {key}")
    if len(tensors) not in (2, 6):
        raise RequestError(grpc.StatusCode.DATA_LOSS,
                           f"peer sent {len(tensors)} tensors for expert {key}, not 2 (weights) or 6 (with moments)")
    gate_up, down = tensors[:2]
    moments = tuple(tensors[2:]) or None
    if moments is not None and [m.shape for m in moments] != [gate_up.shape, down.shape] * 2:
        raise RequestError(grpc.StatusCode.DATA_LOSS, f"peer's moments of expert {key} do not match its weights")
    if gate_up.shape != (2 * geometry.intermediate, geometry.hidden) or down.shape != (geometry.hidden, geometry.intermediate):
        raise RequestError(grpc.StatusCode.DATA_LOSS, f"peer's expert {key} has shapes {list(gate_up.shape)}, {list(down.shape)}")
    if not (gate_up.is_floating_point() and down.is_floating_point()):
        raise RequestError(grpc.StatusCode.DATA_LOSS,
                           f"peer's expert {key} has dtypes {gate_up.dtype}, {down.dtype}; weights are float")
    return gate_up, down, moments
