"""Forward requests of concurrent clients computed as one forward of the model.

Each Forward ran the model on its own: N clients, N forwards, each sending its few tokens
to every worker holding one of its experts, at every MoE layer. Here requests go through a
`RequestBatcher` (workers/request_batcher.py), as a worker's expert calls do: a request that
finds one of its two compute threads idle runs at once, alone, so a light load waits for
nothing; requests that arrive while both compute queue up, and the next forward takes them
together: one RPC per worker per MoE layer for all of them.

Rows of different lengths are padded on the right to the longest. Attention is causal, so a
token never sees the tokens after it, and the padding changes none of a row's logits (only
the summation order inside bigger matmuls: tests check them within 1e-4 of transformers).
Requests go together only with those whose length is in the same power of two, so padding
never doubles a forward's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from moecluster.workers.request_batcher import RequestBatcher

PAD_TOKEN = 0  # any id of the vocabulary: what padding holds never reaches a row's own tokens
THREADS = 2  # forwards in flight at once: one computes while the other waits on its workers' answers


def length_bucket(tokens: int) -> int:
    """The key of requests of this length: lengths in (2^(k-1), 2^k] share k, so the longest is under twice the
    shortest."""
    return (tokens - 1).bit_length()


def pad_together(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B_i, T_i] id tensors as one [sum B_i, max T_i], each padded on the right with PAD_TOKEN."""
    longest = max(ids.shape[1] for ids in rows)
    return torch.cat([torch.nn.functional.pad(ids, (0, longest - ids.shape[1]), value=PAD_TOKEN) for ids in rows])


def split_back(logits: torch.Tensor, rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each request's own [B_i, T_i, V] logits out of the padded batch's."""
    out, start = [], 0
    for ids in rows:
        out.append(logits[start:start + ids.shape[0], :ids.shape[1]])
        start += ids.shape[0]
    return out


class ForwardBatcher:
    """`forward(ids)` -> `logits(ids)` ([B, T] -> [B, T, V]), computed together with the requests queued beside
    it, up to `max_tokens` of theirs a forward (padded: under twice that). A request larger than that is computed
    at once on its own thread. A forward that raises fails every request in it."""

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], max_tokens: int):
        self._logits = logits
        self._batcher = RequestBatcher(self._compute, max_tokens, threads=THREADS, name="frontend-forwards")
        self.max_tokens = max_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._batcher.run(length_bucket(ids.shape[1]), ids, ids.numel())

    def queued(self) -> int:
        """Requests waiting for a forward."""
        return self._batcher.queued()

    @property
    def forwards(self) -> int:
        """Forwards computed (a request too large to share one is a forward of its own)."""
        return self._batcher.calls

    @property
    def requests(self) -> int:
        """Requests those forwards answered (over `forwards`: the mean batch)."""
        return self._batcher.requests

    def close(self) -> None:
        self._batcher.close()

    def _compute(self, _bucket: int, rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(rows) == 1:
            return [self._logits(rows[0])]
        return split_back(self._logits(pad_together(rows)), rows)
