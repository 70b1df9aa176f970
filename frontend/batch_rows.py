"""What each row of the running batch may pick: the end-of-sequence token or not, greedy or drawn.

Requests in one continuous batch differ: one stops at its end-of-sequence token and another must
make exactly its N tokens (what `generate` does with `min_new_tokens`: the token is suppressed), one
is greedy and another samples with a generator of its own. transformers' batch applies the same
processors to every row, so this one processor, appended last, applies each row's own rule: it
suppresses the row's forbidden tokens, then, for a sampled row, leaves only the token its sampler
draws (the batch's argmax then picks it). That is `generate`'s order: processors, then warpers.

transformers asks `prepare_tensor_args` for one int32 per row of the coming forward, in the order of
its logits, then calls the processor with them: here each is the row's slot in that forward's rules.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from moecluster.frontend.sampling import RowSampler, only
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

NO_RULE = -1  # a row of a request not registered here: left as it is


@dataclass(frozen=True)
class RowRule:
    suppress: tuple[int, ...] = ()  # tokens the row may not pick (its end-of-sequence ones, when it makes exactly N)
    sampler: RowSampler | None = None  # None: greedy


class BatchRows(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self):
        self._lock = threading.Lock()
        self._rules: dict[str, RowRule] = {}  # request id -> its row's rule
        self._slots: list[RowRule] = []  # the coming forward's rules, by slot

    def add(self, request_id: str, rule: RowRule) -> None:
        with self._lock:
            self._rules[request_id] = rule

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._rules.pop(request_id, None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(NO_RULE)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        slots, self._slots = [], []
        with self._lock:
            for request in requests_with_new_token:
                rule = self._rules.get(request.state.request_id)
                slots.append(NO_RULE if rule is None else len(self._slots))
                if rule is not None:
                    self._slots.append(rule)
        return torch.tensor(slots, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rules = [(row, self._slots[slot]) for row, slot in enumerate(tensor_arg[: scores.size(0)].tolist())
                 if slot != NO_RULE]
        if not rules:
            return scores
        scores = scores.clone()
        no_ids = torch.empty((1, 0), dtype=torch.long)  # the warpers used here read only the scores
        for row, rule in rules:
            if rule.suppress:
                scores[row, list(rule.suppress)] = float("-inf")
            if rule.sampler is not None:
                scores[row:row + 1] = only(rule.sampler.draw(no_ids, scores[row:row + 1]), scores[row:row + 1])
        return scores
