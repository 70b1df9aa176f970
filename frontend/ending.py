"""How a generation's rows end: at a stop token (kept, then padding), else after max_new_tokens.

A request asks for one of two things, and may add stop tokens to either:
- exactly max_new_tokens tokens, never the checkpoint's end-of-sequence token (`generate` with
  `min_new_tokens`): the token is suppressed;
- `until_eos`: the row ends at that token.
`stop_tokens` end a row too (vLLM's `stop_token_ids`); one of them that is also the end-of-sequence
token is not suppressed. What `generate(eos_token_id=stops, suppress_tokens=never)` does.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_STOP_TOKENS = 64


def eos_tokens(generation_config) -> tuple[int, ...]:
    """A checkpoint's end-of-sequence tokens (its generation_config.json names one, several, or none)."""
    eos = generation_config.eos_token_id
    return (eos,) if isinstance(eos, int) else tuple(eos or ())


class EndingError(ValueError):
    """Stop settings a request cannot have."""


@dataclass(frozen=True)
class Ending:
    stops: tuple[int, ...] = ()  # a row ends at any of these, which it keeps
    never: tuple[int, ...] = ()  # tokens a row never makes

    @classmethod
    def of(cls, eos: tuple[int, ...], *, until_eos: bool = False, stop_tokens=(), vocab: int | None = None) -> Ending:
        """`eos`: the checkpoint's end-of-sequence tokens. EndingError for what cannot be honoured."""
        stop_tokens = [int(t) for t in stop_tokens]
        if until_eos and not eos:
            raise EndingError("until_eos: this checkpoint names no end-of-sequence token (its generation_config.json)")
        if len(stop_tokens) > MAX_STOP_TOKENS:
            raise EndingError(f"stop_tokens: {len(stop_tokens)}, at most {MAX_STOP_TOKENS}")
        bad = [t for t in stop_tokens if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise EndingError(f"stop_tokens: {bad[:5]} are not token ids of this model (0..{vocab - 1 if vocab else '?'})")
        stops = tuple(dict.fromkeys([*(eos if until_eos else ()), *stop_tokens]))
        return cls(stops, () if until_eos else tuple(t for t in eos if t not in stops))

    def made(self, tokens: list[int]) -> int:
        """How many of a row's new tokens it made: up to and with its first stop token."""
        return next((i + 1 for i, token in enumerate(tokens) if token in self.stops), len(tokens))

    def ended(self, tokens: list[int]) -> bool:
        return bool(tokens) and tokens[-1] in self.stops
