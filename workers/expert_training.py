"""What training keeps beside each expert on a worker, and the exactly-once update.

Per expert: AdamW's two moments, the gradient contributions of the step under
way, and the acknowledgements of the last steps applied.  Its version (in the
store) counts the updates applied.  The rules (DESIGN.md, rule 5):

- a gradient for step k is taken only by an expert at version k - 1, and a
  contribution (the trainer's id of one backward call) is never added twice;
- the update of step k applies only at version k - 1 and only with exactly the
  contributions the trainer names; an expert already at k or beyond answers with
  its stored acknowledgement and does not change;
- a newer attempt at a step (the trainer redid it) discards older contributions.

Contributions are kept apart and summed in id order, so every replica that got
the same contributions computes bit-identical weights (the acknowledgement's
digest shows it).  The math is torch.optim.AdamW's single-tensor path, in fp32.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import xxhash
from moecluster.workers.expert_store import ExpertStore

Key = tuple[int, int]
ACKS_KEPT = 8  # acknowledgements of the last steps, for repeated or late updates


class TrainingRefused(Exception):
    """The request does not fit the expert's state (stale or superseded); nothing changed."""


@dataclass(frozen=True)
class AdamW:
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01


@dataclass(frozen=True)
class Ack:
    version: int
    duplicate: bool
    digest: int


@dataclass
class _Pending:
    step: int
    session: str
    attempt: int
    grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # contribution -> grads


Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # exp_avg gate_up, down; exp_avg_sq gate_up, down


def digest(*tensors: torch.Tensor) -> int:
    h = xxhash.xxh3_64()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    return h.intdigest()


class ExpertTraining:
    def __init__(self, store: ExpertStore):
        self.store = store
        self.lock = threading.RLock()  # versions, contributions and updates change together
        self._moments: dict[Key, Moments] = {}
        self._pending: dict[Key, _Pending] = {}
        self._acks: dict[Key, dict[int, Ack]] = {}

    # -- gradients -------------------------------------------------------------

    def check_step(self, keys: list[Key], step: int, session: str, attempt: int) -> None:
        """TrainingRefused unless every expert in `keys` is at version step - 1 and no newer attempt of
        the step has begun there (call under `lock`, then `contribute`)."""
        self.check_version(keys, step, "a gradient")
        for key in keys:
            pending = self._pending.get(key)
            if pending is not None and (pending.step, pending.session) == (step, session) and attempt < pending.attempt:
                raise TrainingRefused(f"expert {key}: attempt {attempt} of step {step} was superseded by attempt "
                                      f"{pending.attempt}")

    def check_version(self, keys: list[Key], step: int, what: str = "a forward") -> None:
        """TrainingRefused unless every expert in `keys` is at version step - 1: what a trainer computes for
        step k must use the weights after step k - 1, never a replica that missed an update (or is ahead)."""
        for key in keys:
            version = self.store.version(*key)
            if version != step - 1:
                raise TrainingRefused(f"expert {key} is at version {version}; {what} for step {step} needs "
                                      f"version {step - 1}" + (" (that step was applied already)" if version >= step else ""))

    def contribute(self, key: Key, step: int, session: str, attempt: int, contribution: int,
                   grads: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Keeps one backward call's weight gradient for the step (after `check_step`); False when it
        was kept before."""
        with self.lock:
            pending = self._pending.get(key)
            if pending is None or (pending.step, pending.session, pending.attempt) != (step, session, attempt):
                pending = self._pending[key] = _Pending(step, session, attempt)
            if contribution in pending.grads:
                return False
            pending.grads[contribution] = grads
            return True

    # -- updates ---------------------------------------------------------------

    def apply(self, step: int, session: str, attempt: int, hyper: AdamW, experts: dict[Key, list[int]],
              average_over: int = 1) -> dict[Key, Ack]:
        """Applies step `step` to each expert of `experts` (key -> contribution ids) at version step - 1,
        with the contributions' sum divided by `average_over` (data-parallel trainers each send the gradient
        of their own mean loss); experts already past it answer their stored acknowledgement.  All or
        nothing: TrainingRefused (nothing changed) when some expert is behind or lacks a named contribution."""
        with self.lock:
            todo, acks = [], {}
            for key, contributions in experts.items():
                version = self.store.version(*key)  # KeyError: not held
                if version >= step:  # repeated or late: the stored answer, no change
                    stored = self._acks.get(key, {}).get(step)
                    acks[key] = Ack(step, True, stored.digest) if stored else Ack(version, True, 0)
                    continue
                if version != step - 1:
                    raise TrainingRefused(f"expert {key} is at version {version}: it missed updates before step {step}")
                pending = self._pending.get(key)
                have = set(pending.grads) if pending and (pending.step, pending.session, pending.attempt) == \
                    (step, session, attempt) else set()
                missing = sorted(set(contributions) - have)
                if missing or len(have) != len(set(contributions)):
                    raise TrainingRefused(f"expert {key}: step {step} names gradient contributions {sorted(contributions)}, "
                                          f"this worker has {sorted(have)}")
                todo.append((key, sorted(set(contributions))))
            for key, contributions in todo:
                acks[key] = self._step(key, step, hyper, contributions, max(average_over, 1))
            return acks

    def _step(self, key: Key, step: int, hyper: AdamW, contributions: list[int], average_over: int) -> Ack:
        gate_up, down = self.store.get(*key)
        params = [gate_up.float(), down.float()]
        pending = self._pending.pop(key, None)
        grads = [torch.zeros_like(p) for p in params]
        for c in contributions:  # in id order: replicas sum alike
            for g, part in zip(grads, pending.grads[c]):
                g.add_(part.float())
        if average_over > 1:
            for g in grads:
                g.div_(average_over)
        moments = self._moments.get(key) or tuple(torch.zeros_like(p) for p in params * 2)
        bias1, bias2 = 1 - hyper.beta1 ** step, 1 - hyper.beta2 ** step
        for p, g, m, v in zip(params, grads, moments[:2], moments[2:]):
            p.mul_(1 - hyper.lr * hyper.weight_decay)
            m.lerp_(g, 1 - hyper.beta1)
            v.mul_(hyper.beta2).addcmul_(g, g, value=1 - hyper.beta2)
            denom = (v.sqrt() / bias2 ** 0.5).add_(hyper.eps)
            p.addcdiv_(m, denom, value=-hyper.lr / bias1)
        new = [p.to(self.store.dtype) for p in params]
        self.store.replace(*key, *new, version=step)
        self._moments[key] = moments
        ack = Ack(step, False, digest(*new))
        kept = self._acks.setdefault(key, {})
        kept[step] = ack
        for old in sorted(kept)[:-ACKS_KEPT]:
            del kept[old]
        return ack

    # -- state that moves ------------------------------------------------------

    def moments(self, key: Key) -> Moments | None:
        """The expert's AdamW moments (shared, not copies: read under `lock`); None before its first update."""
        return self._moments.get(key)

    def adopt(self, key: Key, moments: Moments | None) -> None:
        """State that arrived with an expert (a pull, a restore): its moments, no pending gradient."""
        with self.lock:
            self._pending.pop(key, None)
            self._acks.pop(key, None)
            if moments is None:
                self._moments.pop(key, None)
            else:
                self._moments[key] = tuple(m.to(self.store.device, torch.float32, copy=True) for m in moments)

    def forget(self, keys: list[Key]) -> None:
        with self.lock:
            for key in keys:
                self._moments.pop(key, None)
                self._pending.pop(key, None)
                self._acks.pop(key, None)
