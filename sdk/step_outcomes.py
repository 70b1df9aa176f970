"""How a training step can end, shared by `TrainingSession` and `ExpertOptimizer`."""

from __future__ import annotations

from concurrent import futures

import grpc
from moecluster.frontend.dispatcher import ExpertUnavailableError

RETRYABLE_STEP_ERRORS = (ExpertUnavailableError, grpc.RpcError, futures.TimeoutError)  # a lost worker: redo the step
DONE, REDO, FAILED = 0, 1, 2  # how a member's attempt at a step ended; the group goes by the worst


class TrainingError(RuntimeError):
    """A step that cannot be completed (the text says what is missing); nothing was applied twice."""
