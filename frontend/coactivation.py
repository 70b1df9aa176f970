"""Which experts tokens pick together more often than chance, per MoE layer: what affinity-aware
placement needs.

The dispatcher records every call's routing; a reporter thread sends the result to the controller
every REPORT_EVERY_S (`controller/affinity.py` co-locates the pairs when the spec asks). What is
reported is the excess over chance: a token that picked expert a picks each other expert b with about
(K - 1) n_b / (K n) by chance, so the pair's expected count is n_a n_b (K - 1) / (K n); only an excess
of Z standard deviations counts (a Poisson count's is the square root of its mean), so routing that
is random moves nothing. Counting is cheap: at most SAMPLE_TOKENS tokens of a call, K(K-1)/2 pairs
each, added into an E x E table per layer; the excess is scaled to every token seen.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc
import torch
from moecluster.protos import controller_pb2, controller_pb2_grpc

log = logging.getLogger("moecluster.frontend")

SAMPLE_TOKENS = 256  # tokens counted per call: a sample is as good as all of them, at a bounded cost (~0.1 ms)
REPORT_EVERY_S = 5.0
PAIRS_PER_LAYER = 512  # the heaviest pairs a report names per layer (a few per expert)
Z = 4.0  # standard deviations above chance: with E = 128 (8,128 pairs) about 1 in 30,000 random pairs passes


@dataclass
class _Layer:
    pairs: torch.Tensor  # (E, E) tokens of the sample that picked both (upper triangle)
    experts: torch.Tensor  # (E,) tokens of the sample that picked each
    sampled: int = 0  # tokens in the sample
    seen: int = 0  # tokens routed, sampled or not
    k: int = 0  # experts a token picks

    def grown(self, size: int) -> "_Layer":
        if self.experts.numel() >= size:
            return self
        n = self.experts.numel()
        pairs, experts = torch.zeros((size, size), dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        pairs[:n, :n], experts[:n] = self.pairs, self.experts
        return _Layer(pairs, experts, self.sampled, self.seen, self.k)


class CoActivation:
    """Tokens that picked each pair of experts of a layer together, since the last `take`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._layers: dict[int, _Layer] = {}
        self._since = time.monotonic()

    def record(self, layer: int, index: torch.Tensor) -> None:
        """index: (T, K) experts each token picked."""
        if index.dim() != 2 or index.shape[1] < 2 or index.shape[0] == 0:
            return
        sample = index[:SAMPLE_TOKENS].to(torch.int64)
        if bool((sample < 0).any()):
            return  # -1 marks a slot without an expert: not a router's choice, nothing to learn from
        slots = torch.triu_indices(sample.shape[1], sample.shape[1], 1)  # each pair of a token's picks once
        first, second = sample[:, slots[0]], sample[:, slots[1]]
        size = int(sample.max()) + 1
        with self._lock:
            empty = torch.zeros(0, dtype=torch.float64)
            counts = self._layers.get(layer) or _Layer(empty.view(0, 0), empty)
            counts = self._layers[layer] = counts.grown(size)
            n = counts.experts.numel()
            ids = (torch.minimum(first, second) * n + torch.maximum(first, second)).view(-1)  # O(pairs), not O(E^2)
            counts.pairs.view(-1).index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))
            counts.experts.index_add_(0, sample.view(-1), torch.ones(sample.numel(), dtype=torch.float64))
            counts.sampled += sample.shape[0]
            counts.seen += index.shape[0]
            counts.k = index.shape[1]

    def take(self) -> tuple[float, dict[int, list[tuple[int, int, float]]]]:
        """(seconds counted, {layer: [(expert a, expert b, tokens beyond chance)], the heaviest first});
        starts counting anew."""
        with self._lock:
            layers, self._layers = self._layers, {}
            now = time.monotonic()
            seconds, self._since = now - self._since, now
        out = {}
        for layer, c in layers.items():
            n = c.experts.numel()
            expected = torch.outer(c.experts, c.experts) * (c.k - 1) / (c.k * c.sampled)
            excess = torch.triu(c.pairs - expected, diagonal=1)
            excess[excess <= Z * torch.sqrt(expected + 1.0)] = 0.0
            flat = excess.view(-1)
            found = int((flat > 0).sum())
            if not found:
                continue
            tokens, ids = torch.topk(flat, min(found, PAIRS_PER_LAYER))
            scale = c.seen / c.sampled
            out[layer] = [(int(i) // n, int(i) % n, float(t) * scale) for i, t in zip(ids, tokens)]
        return seconds, out


class RoutingReporter(threading.Thread):
    """Sends what `counts` saw to the controller every REPORT_EVERY_S, until stopped."""

    def __init__(self, stub: controller_pb2_grpc.ControllerStub, counts: CoActivation, frontend_id: str,
                 metadata=(), every_s: float = REPORT_EVERY_S):
        super().__init__(daemon=True, name="routing-report")
        self.stub, self.counts, self.frontend_id, self.metadata, self.every_s = stub, counts, frontend_id, metadata, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            seconds, pairs = self.counts.take()
            if not pairs:
                continue
            report = controller_pb2.RoutingReport(frontend_id=self.frontend_id, seconds=seconds, layers=[
                controller_pb2.ExpertPairs(layer=layer, first=[a for a, _, _ in found], second=[b for _, b, _ in found],
                                           tokens=[t for _, _, t in found])
                for layer, found in sorted(pairs.items())])
            try:
                self.stub.ReportRouting(report, timeout=5, metadata=self.metadata)
            except grpc.RpcError as err:  # a controller away for a moment: this window's counts are lost, no more
                log.debug("routing report failed (%s)", err.code().name)
