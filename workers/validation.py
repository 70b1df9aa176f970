"""Checks on what callers send a worker, before any state is touched.

Each failure is a `RequestError` carrying the gRPC status a caller can act on:
INVALID_ARGUMENT for a request that can never succeed (the text names the field,
the value and what was expected), FAILED_PRECONDITION for a valid request that
reached a worker that does not hold the expert (the caller's routing table is
stale; the worker's epoch is in the text).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch
from moecluster.models.checkpoint import Geometry
from moecluster.protos import worker_pb2
from moecluster.wire.tensors import WireError, decode
from moecluster.workers.expert_store import LayerExperts
from moecluster.workers.request_error import RequestError, invalid

MAX_TOKENS = 65536  # per Forward; larger batches are split by the caller
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class ForwardInputs:
    layer: int
    hidden_states: torch.Tensor  # (T, H) float
    top_k_index: torch.Tensor  # (T, K) int, global ids or -1
    top_k_weights: torch.Tensor  # (T, K) float


def check_layer(geometry: Geometry, layer: int) -> None:
    if layer not in geometry.moe_layers:
        raise invalid(f"layer {layer} has no routed experts; MoE layers are {list(geometry.moe_layers)}")


def check_expert_key(geometry: Geometry, key: worker_pb2.ExpertKey) -> tuple[int, int]:
    check_layer(geometry, key.layer)
    if not 0 <= key.expert < geometry.num_experts:
        raise invalid(f"expert {key.expert} is out of range: layer {key.layer} has experts 0..{geometry.num_experts - 1}")
    return key.layer, key.expert


def check_forward(geometry: Geometry, request: worker_pb2.ForwardRequest, *, refuse_non_finite: bool = True) -> ForwardInputs:
    """ForwardRequest -> decoded tensors, or RequestError(INVALID_ARGUMENT) naming what is wrong."""
    check_layer(geometry, request.layer)
    try:
        hidden = decode(request.hidden_states, name="hidden_states")
        index = decode(request.top_k_index, name="top_k_index")
        weights = decode(request.top_k_weights, name="top_k_weights")
    except WireError as err:
        raise invalid(str(err)) from None
    if hidden.dtype not in FLOAT_DTYPES:
        raise invalid(f"hidden_states: dtype {request.hidden_states.dtype} is not a float type")
    if hidden.dim() != 2 or hidden.shape[1] != geometry.hidden:
        raise invalid(f"hidden_states: shape {list(hidden.shape)}, expected [T, {geometry.hidden}]")
    tokens = hidden.shape[0]
    if tokens > MAX_TOKENS:
        raise invalid(f"hidden_states: {tokens} tokens in one request, more than the limit of {MAX_TOKENS}")
    if index.dtype not in INDEX_DTYPES:
        raise invalid(f"top_k_index: dtype {request.top_k_index.dtype} is not int32 or int64")
    if index.dim() != 2 or index.shape[0] != tokens or not 1 <= index.shape[1] <= geometry.num_experts:
        raise invalid(
            f"top_k_index: shape {list(index.shape)}, expected [{tokens}, K] with 1 <= K <= {geometry.num_experts}"
        )
    if weights.dtype not in FLOAT_DTYPES:
        raise invalid(f"top_k_weights: dtype {request.top_k_weights.dtype} is not a float type")
    if weights.shape != index.shape:
        raise invalid(f"top_k_weights: shape {list(weights.shape)} differs from top_k_index {list(index.shape)}")
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < -1 or high >= geometry.num_experts:
            bad = low if low < -1 else high
            raise invalid(f"top_k_index: expert id {bad} is out of range [-1, {geometry.num_experts - 1}]")
        ordered = index.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if repeated.any():
            row = int(repeated.any(dim=1).nonzero()[0])
            raise invalid(f"top_k_index: token {row} lists the same expert twice: {index[row].tolist()}")
    if refuse_non_finite:
        for name, tensor in (("hidden_states", hidden), ("top_k_weights", weights)):
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                raise invalid(f"{name}: contains NaN or Inf")
    return ForwardInputs(request.layer, hidden, index, weights)


def check_held(snapshot: LayerExperts | None, inputs: ForwardInputs, epoch: int) -> torch.Tensor:
    """Global ids -> local slots; FAILED_PRECONDITION when an expert is not held here."""
    index = inputs.top_k_index
    if snapshot is None:
        wanted = sorted({int(e) for e in index.flatten().tolist() if e >= 0})
        if not wanted:
            return torch.full_like(index, -1, dtype=torch.long)
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"experts {wanted[:8]} of layer {inputs.layer} are not on this worker (worker epoch {epoch})",
        )
    local = snapshot.local_index(index)
    missing = (local < 0) & (index >= 0)
    if missing.any():
        wanted = sorted({int(e) for e in index[missing].tolist()})
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"experts {wanted[:8]} of layer {inputs.layer} are not on this worker (worker epoch {epoch})",
        )
    return local


@dataclass(frozen=True)
class BackwardInputs:
    forward: ForwardInputs
    grad_output: torch.Tensor  # (T, H) float
    primary: torch.Tensor  # (T, K) bool


def check_backward(geometry: Geometry, request: worker_pb2.BackwardRequest) -> BackwardInputs:
    """BackwardRequest -> decoded tensors, or RequestError(INVALID_ARGUMENT) naming what is wrong."""
    forward = check_forward(geometry, worker_pb2.ForwardRequest(
        layer=request.layer, hidden_states=request.hidden_states, top_k_index=request.top_k_index,
        top_k_weights=request.top_k_weights))
    if request.step < 1:
        raise invalid("step: 0; training steps count from 1 (the update that takes an expert to version 1)")
    if not request.session:
        raise invalid("session: empty; every trainer names itself")
    try:
        grad = decode(request.grad_output, name="grad_output")
        primary = decode(request.primary, name="primary")
    except WireError as err:
        raise invalid(str(err)) from None
    if grad.dtype not in FLOAT_DTYPES or grad.shape != forward.hidden_states.shape:
        raise invalid(f"grad_output: {grad.dtype} {list(grad.shape)}, expected a float tensor shaped like "
                      f"hidden_states {list(forward.hidden_states.shape)}")
    if primary.dtype != torch.bool or primary.shape != forward.top_k_index.shape:
        raise invalid(f"primary: {primary.dtype} {list(primary.shape)}, expected bool {list(forward.top_k_index.shape)}")
    if grad.numel() and not bool(torch.isfinite(grad).all()):
        raise invalid("grad_output: contains NaN or Inf")
    return BackwardInputs(forward, grad, primary)
