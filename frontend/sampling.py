"""Sampled generation: each row draws its tokens from a generator of its own, seeded by its request.

`model.generate(do_sample=True)` draws from torch's global generator, so two requests sampled at once
take each other's random numbers and a seed no longer says what comes out. Here a row is given a
`torch.Generator` seeded `seed + row`, and its tokens are drawn by a logits processor that samples
the row's warped scores with that generator and leaves only the drawn token (every other score -inf):
a greedy step then picks it. The same processor runs inside `model.generate` (a request decoded alone)
and inside the running batch (`batch_rows.BatchRows`), where sampled and greedy rows of different
requests share each forward. Row r of a request is what `torch.manual_seed(seed + r)`
followed by transformers' `generate` of that row alone with the same settings draws (on the same
device): the warpers are transformers' own, applied in its order, then softmax and one multinomial
draw per step (tests/test_sampling.py checks it token by token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


class SamplingError(ValueError):
    """Sampling settings a request cannot have."""


@dataclass(frozen=True)
class Sampling:
    """How a sampled request draws: temperature > 0, top_k >= 0 (0: every token), 0 < top_p <= 1."""

    temperature: float
    top_k: int
    top_p: float
    seed: int

    @classmethod
    def resolve(cls, model_defaults: GenerationConfig, seed: int, *, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None) -> Sampling:
        """Each setting the request leaves out is the checkpoint's (its generation_config.json), else
        transformers' own default: what `generate` itself would use."""
        fallback = GenerationConfig._get_default_generation_params()

        def pick(name, given):
            if given is not None:
                return given
            own = getattr(model_defaults, name, None)
            return own if own is not None else fallback[name]

        sampling = cls(float(pick("temperature", temperature)), int(pick("top_k", top_k)),
                       float(pick("top_p", top_p)), int(seed))
        if not sampling.temperature > 0:
            raise SamplingError(f"temperature: {sampling.temperature}, expected more than 0")
        if sampling.top_k < 0:
            raise SamplingError(f"top_k: {sampling.top_k}, expected 0 (every token) or more")
        if not 0 < sampling.top_p <= 1:
            raise SamplingError(f"top_p: {sampling.top_p}, expected more than 0 and at most 1")
        return sampling

    def warpers(self) -> LogitsProcessorList:
        """transformers' warpers for these settings, in `generate`'s order (its `_get_logits_processor`)."""
        out = LogitsProcessorList()
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k != 0:
            out.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return out


class RowSampler:
    """One row's draws: its warpers and its generator, advanced once per token it samples."""

    def __init__(self, sampling: Sampling, row: int, device: torch.device | str = "cpu"):
        self.warpers = sampling.warpers()
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed + row)

    def draw(self, input_ids: torch.Tensor, scores: torch.Tensor) -> int:
        """`scores` (1, V), after every other processor -> the token drawn."""
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))


def only(token: int, scores: torch.Tensor) -> torch.Tensor:
    """A row's scores with every token but `token` at -inf: the greedy step that follows picks it."""
    out = torch.full_like(scores, float("-inf"))
    out[..., token] = 0.0
    return out


class SampledRows(LogitsProcessor):
    """For `model.generate(do_sample=False, logits_processor=[...])`: row b draws with `samplers[b]`."""

    def __init__(self, samplers: list[RowSampler]):
        self.samplers = samplers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return torch.cat([only(s.draw(input_ids[b:b + 1], scores[b:b + 1]), scores[b:b + 1])
                          for b, s in enumerate(self.samplers)])
