"""Several trainers stepping one expert pool together (data parallelism).

Each trainer holds a copy of the dense model and trains on its own part of the
batch; the experts, their gradients and AdamW state stay on the workers, shared.
A step of the group is one step of the pool:

- the group's first trainer (the leader) is the only one the controller sees as a
  trainer: it holds the step gate for all, from before any member's first forward
  until every member has finished the step, so a copy of expert state never sees
  half a step of any member;
- every member's backward calls add gradient contributions under one session id
  (the leader's) with ids no other member uses; the leader applies the update once,
  naming all of them, and the workers divide the sum by the group's size, as
  DistributedDataParallel averages the dense gradients, which the members all-reduce;
- when any member's step is cut (a lost worker), all redo it together, in a new attempt.

`TrainerGroup(None)` is a trainer alone: every collective returns its own input.
Control messages go over gloo even when the gradients go over NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterable, Iterator
from typing import Any

import torch

BUCKET_ELEMENTS = 1 << 24  # dense gradients are all-reduced in flat buckets of at most this many elements


class TrainerGroupBroken(RuntimeError):
    """A collective of the group failed: a member died (its connections closed) or the group's timeout passed.
    The group cannot go on; its launcher restarts it (`moectl train --resume auto` under torchrun --max-restarts)."""


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:  # gloo and NCCL raise RuntimeError (or its DistBackendError) for a lost peer
        raise TrainerGroupBroken(f"the trainer group broke during {what}; another trainer is gone or hangs: "
                                 f"{str(err).splitlines()[0]}") from err


class TrainerGroup:
    def __init__(self, process_group=None, timeout: datetime.timedelta | None = None):
        """`process_group`: a torch.distributed group of the trainers (`torch.distributed.group.WORLD` under
        torchrun); None for a trainer alone. `timeout`: that of the gloo group made for control messages
        when `process_group` is not gloo (give it the one `process_group` was made with)."""
        self.process_group = process_group
        if process_group is None:
            self.size, self.rank = 1, 0
            return
        import torch.distributed as dist

        self._dist = dist
        self.size, self.rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        self._leader = dist.get_global_rank(process_group, 0)
        self._control = process_group if dist.get_backend(process_group) == "gloo" else \
            dist.new_group(dist.get_process_group_ranks(process_group), backend="gloo", timeout=timeout)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def from_leader(self, value: Any) -> Any:
        """The leader's `value`, on every member (the others' `value` is ignored)."""
        if self.size == 1:
            return value
        box = [value]
        with _collective("a message from the first trainer"):
            self._dist.broadcast_object_list(box, src=self._leader, group=self._control)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every member's `value`, in rank order."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        with _collective("a gather"):
            self._dist.all_gather_object(out, value, group=self._control)
        return out

    def worst(self, code: int) -> int:
        """The largest of the members' codes (how a member's failure reaches all)."""
        if self.size == 1:
            return code
        flag = torch.tensor([code], dtype=torch.int64)
        with _collective("the agreement on how a step ended"):
            self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX, group=self._control)
        return int(flag.item())

    def mean(self, value: float) -> float:
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        with _collective("a mean"):
            self._dist.all_reduce(total, group=self._control)
        return float(total.item()) / self.size

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Every member's dense gradients become their mean over the group. A parameter no member has a
        gradient for keeps None (AdamW skips it, as it would alone); one that only some members have is
        taken as zero on the others."""
        if self.size == 1:
            return
        with _collective("the dense gradients' all-reduce"):
            self._average_gradients([p for p in params if p.requires_grad])

    def _average_gradients(self, params: list[torch.Tensor]) -> None:
        have = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
        self._dist.all_reduce(have, op=self._dist.ReduceOp.MAX, group=self._control)
        used = [p for p, h in zip(params, have.tolist()) if h]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(used):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            self._dist.all_reduce(flat, group=self.process_group)
            flat.div_(self.size)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()


def _buckets(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters in groups of one dtype and device, each at most BUCKET_ELEMENTS (or one larger parameter),
    in a fixed order: every member builds the same buckets."""
    out: list[list[torch.Tensor]] = []
    filling: dict[tuple, tuple[list[torch.Tensor], int]] = {}  # (dtype, device) -> the bucket being filled, its size
    for p in params:
        kind = (p.grad.dtype, p.grad.device)
        bucket, size = filling.get(kind, (None, 0))
        if bucket is None or size + p.numel() > BUCKET_ELEMENTS:
            bucket, size = [], 0
            out.append(bucket)
        bucket.append(p)
        filling[kind] = (bucket, size + p.numel())
    return out
