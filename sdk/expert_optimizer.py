"""AdamW for a model whose experts live on the workers (`TrainingSession`'s optimizer)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from moecluster.sdk.step_outcomes import DONE, FAILED, REDO, RETRYABLE_STEP_ERRORS, TrainingError
from torch import nn

if TYPE_CHECKING:
    from moecluster.sdk.training import TrainingSession


class ExpertOptimizer:
    """AdamW for a model whose experts live on the workers: the dense parameters step here
    (torch.optim.AdamW), the experts' on their workers, in one `step()` / `zero_grad()`."""

    def __init__(self, model: nn.Module, session: TrainingSession, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 retries: int = 5):
        self.session = session
        self.hyper = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **self.hyper)
        if session.resumed is not None:
            if not session.resumed.optimizer:
                raise TrainingError("a resumed session's optimizer state went into its first ExpertOptimizer")
            self.dense.load_state_dict(session.resumed.optimizer)
            for group in self.dense.param_groups:  # the hyperparameters given here win over the saved ones
                group.update(self.hyper)
            session.resumed = dataclasses.replace(session.resumed, optimizer={})  # in the optimizer now
        self.retries = retries

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.session.new_attempt()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One training step. With a closure (which must call zero_grad, forward and backward, as
        for torch.optim.LBFGS), a step interrupted by a lost worker is redone on the survivors; in a
        group, by every member (each returns the loss of its own part of the batch)."""
        group = self.session.group
        if closure is None and group.size > 1:
            raise TrainingError("a group's step() needs the closure: the members redo a cut step together")
        loss = None
        if closure is not None:
            loss = self._run(closure)
        try:
            group.average_gradients(p for g in self.dense.param_groups for p in g["params"])
            self.session.apply_update(**self.hyper)
            self.dense.step()
        finally:
            self.session.end_step()
        return loss

    def _run(self, closure: Callable[[], torch.Tensor]):
        session = self.session
        for attempt in range(self.retries + 1):
            loss, error, ended = None, None, DONE
            try:
                session.begin_group_step()
                loss = closure()
            except RETRYABLE_STEP_ERRORS as err:
                error, ended = err, REDO
            except Exception as err:  # noqa: BLE001 - the group hears of it, then it is raised
                error, ended = err, FAILED
            worst = session.group.worst(ended)
            if worst == DONE:
                return loss
            if ended == FAILED:
                raise error
            if worst == FAILED:
                raise TrainingError(f"step {session.step}: another trainer of the group failed (its log says why)")
            why = f"{type(error).__name__}: {error}" if error else "another trainer of the group lost a worker"
            if attempt == self.retries:
                raise TrainingError(f"step {session.step} failed {attempt + 1} times; last: {why}") from error
            session.progress(f"step {session.step}: {why}; redoing it")
            self.dense.zero_grad()
            session.redo()  # lets a pending copy through, then the next attempt replaces the gradients
            time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
