"""Helpers shared by the worker RPC tests: stubs, random routings, expected answers, small queries."""

from __future__ import annotations

import socket

import grpc
import torch
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import streaming
from moecluster.wire.tensors import decode, encode
from moecluster.workers.kernels import reference_experts

TIMEOUT_S = 30.0


def stub_for(server) -> tuple[grpc.Channel, worker_pb2_grpc.ExpertWorkerStub]:
    channel = grpc.insecure_channel(server.address, options=streaming.GRPC_OPTIONS)
    return channel, worker_pb2_grpc.ExpertWorkerStub(channel)


def routing(tokens: int, experts: list[int], k: int = 2, seed: int = 0, index_dtype=torch.int32, dtype=torch.float32):
    """Random (hidden [T, H], index [T, k] of distinct ids drawn from `experts`, weights [T, k])."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=gen).to(dtype)
    choices = torch.tensor(experts)
    picks = torch.stack([torch.randperm(len(experts), generator=gen)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.long)
    index = choices[picks].to(index_dtype)
    weights = torch.rand(tokens, k, generator=gen).to(dtype)
    return hidden, index, weights


def request(layer, hidden, index, weights, epoch=0) -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(layer=layer, hidden_states=encode(hidden), top_k_index=encode(index),
                                     top_k_weights=encode(weights), epoch=epoch)


def forward(stub, layer, hidden, index, weights) -> torch.Tensor:
    response = stub.Forward(request(layer, hidden, index, weights), timeout=TIMEOUT_S)
    return decode(response.output).clone()


def expected(weights_of, layer, hidden, index, top_w) -> torch.Tensor:
    return reference_experts(hidden.float(), *weights_of[layer], index.long(), top_w.float())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def stats(stub) -> worker_pb2.StatsResponse:
    return stub.Stats(worker_pb2.StatsRequest(), timeout=TIMEOUT_S)


def held(stub) -> list[tuple[int, int]]:
    return [(k.layer, k.expert) for k in stats(stub).held]


def keys(*pairs) -> list[worker_pb2.ExpertKey]:
    return [worker_pb2.ExpertKey(layer=l, expert=e) for l, e in pairs]


def pairs(expert_keys) -> list[tuple[int, int]]:
    return [(k.layer, k.expert) for k in expert_keys]


def export(stub, layer, expert) -> tuple[worker_pb2.ExpertState, list]:
    chunks = list(stub.ExportExpert(worker_pb2.ExportExpertRequest(expert=keys((layer, expert))[0]), timeout=TIMEOUT_S))
    payload = streaming.join(iter(chunks), limit_bytes=1 << 24)  # checks size and CRC
    return worker_pb2.ExpertState.FromString(payload), chunks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
