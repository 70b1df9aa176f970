"""Generations of concurrent requests decoded together (transformers' continuous batching).

Each Generate request used to run a decode loop of its own: N clients, N forwards per new
token, each sending its one token to every worker holding one of its experts. Here every
request's sequences join one running batch (transformers' `ContinuousBatchingManager`,
with its paged KV cache), so each step is one forward of every active sequence's next
token: one RPC per worker per layer for all of them, and a request joins or leaves between
steps without waiting for the others.

Used for requests that fit the cache, of the families whose attention the paged cache takes
(DeepSeek's MLA does not: its values are narrower than its keys). Greedy and sampled requests
share the batch, and so do requests that end at their end-of-sequence or stop tokens and those that
make exactly their N tokens: each row has its own rule (`batch_rows.BatchRows`), and a sampled row draws
with a generator of its own, so its seed says what it draws whatever else is in the batch. A request
may stream (GenerateStream): its rows' tokens are handed on as each step decodes them, and a `stop`
event takes its rows out of the batch once its caller is gone. The answers are the same tokens as
`model.generate` (tests/test_equivalence.py, test_sampling.py and test_end_of_sequence.py check them
against transformers).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures

from moecluster.frontend.batch_rows import BatchRows, RowRule
from moecluster.frontend.ending import Ending, eos_tokens
from moecluster.frontend.sampling import RowSampler, Sampling
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

BATCHED_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")  # checked equal to generate, token by token
PAGE_TOKENS = 32

log = logging.getLogger("moecluster.frontend")


class GenerationFailed(RuntimeError):
    """The running batch failed (a forward raised: every copy of an expert lost); its requests with it."""


class GenerationBatcher:
    """`generate(rows, new_tokens)` -> each row's continuation of exactly `new_tokens` tokens (greedy, or
    drawn as `sampling` says), decoded in one running batch with every other request's. `cache_tokens`: the KV cache, in
    tokens of all sequences at once (a request that cannot fit alone is not taken: `fits`); `step_tokens`:
    the most tokens one forward computes (prompts are cut into chunks of it)."""

    def __init__(self, model: nn.Module, *, cache_tokens: int = 4096, step_tokens: int = 256):
        if cache_tokens < PAGE_TOKENS or step_tokens < 1:
            raise ValueError(f"cache_tokens {cache_tokens} (at least {PAGE_TOKENS}) and step_tokens {step_tokens} "
                             "(at least 1)")
        self.model = model
        self.config = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS, num_blocks=cache_tokens // PAGE_TOKENS, max_batch_tokens=step_tokens,
            auto_switch_to_flash=False,  # the model's own attention: the plain Forward path shares the model
            use_cuda_graph=False, use_async_batching=False)  # each MoE layer's tokens leave for the workers mid-graph
        self.capacity = (cache_tokens // PAGE_TOKENS) * PAGE_TOKENS
        self._lock = threading.Lock()
        self._manager = None
        self._waiting: dict[str, _Waiting] = {}  # request id -> its row
        self._ids = itertools.count()
        self._closed = False
        self._collector: threading.Thread | None = None
        self._rows = BatchRows()
        self.eos = eos_tokens(model.generation_config)

    def fits(self, prompt_tokens: int, new_tokens: int) -> bool:
        return prompt_tokens + new_tokens <= self.capacity

    def generate(self, rows: list[list[int]], new_tokens: int, timeout: float, sampling: Sampling | None = None,
                 on_tokens: OnTokens | None = None, stop: threading.Event | None = None,
                 ending: Ending | None = None) -> list[list[int]]:
        """`ending`: where a row may end early (ending.py); by default it has exactly `new_tokens` tokens, never
        the end-of-sequence token (`generate` with min_new_tokens).
        GenerationFailed when the batch failed or the loop takes nothing; TimeoutError past `timeout` s;
        GenerationStopped once `stop` is set (the rows are taken out of the batch). `on_tokens(row, tokens)`:
        each row's new tokens as the batch decodes them (on the collecting thread: it must not block)."""
        deadline = time.monotonic() + timeout
        waiting: list[tuple[str, _Waiting]] = []
        try:
            with self._lock:
                manager = self._running()
                for number in range(len(rows)):
                    request_id = f"moe-{next(self._ids)}"
                    streamed = None if on_tokens is None else functools.partial(on_tokens, number)
                    waiting.append((request_id, _Waiting(futures.Future(), manager, streamed)))
                    self._waiting[request_id] = waiting[-1][1]
            ending = ending or Ending(never=self.eos)
            for number, ((request_id, _), row) in enumerate(zip(waiting, rows)):
                sampler = None if sampling is None else RowSampler(sampling, number, self.model.device)
                self._rows.add(request_id, RowRule(suppress=ending.never, sampler=sampler))
                if manager.add_request(row, request_id=request_id, max_new_tokens=new_tokens,
                                       eos_token_id=list(ending.stops) or -1,
                                       streaming=on_tokens is not None) is None:
                    raise GenerationFailed("the batched generation loop takes no new requests")
            out = []
            for _, each in waiting:
                result = _wait(each.future, deadline, stop)
                if result.error is not None:
                    raise GenerationFailed(result.error)
                made = result.generated_tokens
                if len(made) != new_tokens and not (ending.ended(made) and len(made) < new_tokens):
                    raise GenerationFailed(f"the batch generated {len(made)} of {new_tokens} tokens")
                out.append(list(result.generated_tokens))
            return out
        except futures.TimeoutError:
            raise TimeoutError(f"no generation within {timeout:.0f} s") from None
        finally:
            with self._lock:
                for request_id, each in waiting:
                    self._waiting.pop(request_id, None)
                    self._rows.remove(request_id)
                    if not each.future.done():  # stopped, timed out, or a row before it failed: stop computing it
                        manager.cancel_request(request_id)

    def close(self) -> None:
        with self._lock:
            self._closed, manager = True, self._manager
        if manager is not None and manager.is_running():
            manager.stop(block=True, timeout=30)
        if self._collector is not None:
            self._collector.join(30)

    def _running(self):
        """The manager (under the lock), started again if its loop died with a failed batch."""
        if self._closed:
            raise GenerationFailed("the frontend is stopping")
        if self._manager is None or not self._manager.is_running():
            if self._manager is not None:
                log.warning("the batched generation loop stopped; starting it again")
            # Each row's end-of-sequence token and sampling are its own (BatchRows): the batch itself is greedy
            generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
            self._manager = self.model.init_continuous_batching(generation_config=generation,
                                                                continuous_batching_config=self.config)
            _apply_last(self._manager, self._rows)
            _start_as_daemon(self._manager)
            if self._collector is None:
                self._collector = threading.Thread(target=self._collect, name="generation-results", daemon=True)
                self._collector.start()
        return self._manager

    def _collect(self) -> None:
        """Hands each finished result to the request waiting for it; fails those of a loop that died."""
        while True:
            with self._lock:
                if self._closed:
                    return
                manager = self._manager
            result = manager.get_result(timeout=0.2)  # at once None once the loop died and its queue is empty
            if result is not None:
                with self._lock:
                    each = self._waiting.get(result.request_id)
                if each is not None:
                    each.stream(result.generated_tokens)
                    if result.is_finished():
                        _settle(each.future, result)
            elif not manager.is_running():
                error = GenerationFailed(f"the batched generation loop stopped: "
                                         f"{manager.background_thread_status.fatal_error or 'no reason given'}")
                with self._lock:
                    lost = [w.future for w in self._waiting.values() if w.manager is manager and not w.future.done()]
                for future in lost:
                    _settle(future, error)
                time.sleep(0.05)


OnTokens = Callable[[int, list[int]], None]  # (row, its new tokens)


class GenerationStopped(RuntimeError):
    """The caller stopped waiting (a streaming client went away): its rows were taken out of the batch."""


@dataclasses.dataclass
class _Waiting:
    """One row in the batch: its result to come, the manager computing it, and where its tokens stream."""

    future: futures.Future
    manager: object
    on_tokens: Callable[[list[int]], None] | None
    sent: int = 0  # tokens streamed so far

    def stream(self, generated: list[int]) -> None:
        """Hands on the tokens of `generated` (all the row's tokens so far) not yet handed on."""
        if self.on_tokens is not None and len(generated) > self.sent:
            self.on_tokens(list(generated[self.sent:]))
            self.sent = len(generated)


def _wait(future: futures.Future, deadline: float, stop: threading.Event | None):
    """future.result() by `deadline` (futures.TimeoutError), or GenerationStopped once `stop` is set."""
    while True:
        left = deadline - time.monotonic()
        try:
            return future.result(timeout=max(0.0, left) if stop is None else max(0.0, min(left, 0.05)))
        except futures.TimeoutError:
            if stop is not None and stop.is_set():
                raise GenerationStopped("the caller stopped waiting") from None
            if left <= 0:
                raise


def _settle(future: futures.Future, outcome) -> None:
    """A result or an exception, unless the future already has one."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except futures.InvalidStateError:
        pass


def _apply_last(manager, rows: BatchRows) -> None:
    """Appends `rows` to the batch's logits processors. Before the loop starts: it sizes the processors'
    arguments then (transformers 5.23's `ContinuousBatchingManager`, pinned; `init_continuous_batching`
    takes no processors of ours)."""
    processors = manager.logit_processor
    processors.logits_processor.append(rows)
    processors.tensors_required += 1
    processors.do_processing = True


def _start_as_daemon(manager) -> None:
    """`manager.start()`, but its loop a daemon thread: an idle loop never ends on its own, and a service
    left unclosed must not keep its process from exiting (transformers 5.23's start(), pinned)."""
    manager.background_thread_status.clear()
    manager._generation_thread = threading.Thread(target=manager._run_generation_loop, name="generation-loop",
                                                  daemon=True)
    manager._generation_thread.start()
