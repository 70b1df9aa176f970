"""A generation's tokens handed to its client as they are decoded (the GenerateStream RPC).

The generation runs on a thread of its own and puts each row's new tokens into a queue; the RPC's
thread yields them as chunks. When the RPC ends early (the client cancelled or went away, or its
deadline passed) gRPC's callback sets `stop`: the running batch takes the rows out
(`GenerationBatcher.generate(stop=...)`) and a generation decoded alone stops at its next token
(`StopWhenSet`), so an abandoned request stops costing forwards within one step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

_DONE = object()


class TokenStream:
    """`run(on_tokens, stop)` on a thread of its own; iterating yields `(row, tokens)` as they come and
    raises what `run` raised. `stop` is set once the consumer is gone (`close`, or gRPC's callback)."""

    def __init__(self, run: Callable[[Callable[[int, list[int]], None], threading.Event], object]):
        self.stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(run,), name="generate-stream", daemon=True)
        self._thread.start()

    def _run(self, run) -> None:
        try:
            run(lambda row, tokens: self._queue.put((row, tokens)), self.stop)
            self._queue.put(_DONE)
        except BaseException as err:  # noqa: BLE001 - raised again on the consumer's thread
            self._queue.put(err)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        try:
            while (item := self._queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()


class RowStreamer(BaseStreamer):
    """For `model.generate(streamer=...)`: each step's token of every row, to `on_tokens(row, [token])`;
    a row that made one of `stops` has ended (generate pads it from then on: not handed on)."""

    def __init__(self, on_tokens: Callable[[int, list[int]], None], stops: tuple[int, ...] = ()):
        self.on_tokens = on_tokens
        self.stops = set(stops)
        self._prompt = True
        self._ended: set[int] = set()

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:  # generate hands on the prompt first
            self._prompt = False
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if row not in self._ended:
                self.on_tokens(row, [token])
                if token in self.stops:
                    self._ended.add(row)

    def end(self) -> None:
        pass


class StopWhenSet(StoppingCriteria):
    """Ends `model.generate` at the next token once `stop` is set."""

    def __init__(self, stop: threading.Event):
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)
