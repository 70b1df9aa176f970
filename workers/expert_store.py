"""The experts one worker holds: per-layer slot buffers, read through immutable snapshots.

Each layer's experts live in stacked buffers ([C, 2I, H], [C, H, I]) with a free
slot list, which is what lets the fused kernel run them as one grouped
computation over slot indices.  Adding an expert copies it into a free slot
(growing the buffers by half when full): a pull costs one copy of that expert,
not of every expert the layer already holds.  A change swaps in a new snapshot
under a lock, so a Forward never sees a half-applied load or drop.

A layer's buffers stay when its last expert leaves: the next expert of that layer
lands in memory already mapped (a fresh 100 MB buffer costs page faults that take
a third of a loopback pull), so a worker holds the memory of its peak, no more.
A pull receives straight into a reserved slot that readers cannot see until it
is committed.  A dropped expert's slot is reused only once no reader that could still see it
remains: readers hold `reading(layer)` for as long as they use a snapshot's
tensors, and freed slots wait for every reader of an older generation to leave.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

MIN_SLOTS = 4


@dataclass(frozen=True)
class LayerExperts:
    """One layer's experts on this worker, as one reader sees them."""

    experts: tuple[int, ...]  # global expert ids held
    slots: tuple[int, ...]  # the buffer slot of each of `experts`
    gate_up: torch.Tensor  # (C, 2I, H) buffer; only `slots` hold experts
    down: torch.Tensor  # (C, H, I)
    slot_of: torch.Tensor  # (E + 1,) int64: global id -> slot, -1 where not held; entry E maps -1 to -1

    def local_index(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """(T, K) global ids (or -1) -> (T, K) int64 slots (or -1); -1 also for experts not held."""
        return self.slot_of[top_k_index.long()]

    def slot(self, expert: int) -> int:
        return self.slots[self.experts.index(expert)]


@dataclass
class _Layer:
    gate_up: torch.Tensor
    down: torch.Tensor
    slot_of: dict[int, int]  # global id -> slot
    free: list[int]
    retired: list[tuple[int, int]]  # (generation of the drop, slot): free once older readers left
    reserved: dict[int, int]  # global id -> slot being written by a pull, invisible to readers


@dataclass(frozen=True)
class Reservation:
    """A slot a pull writes into (`gate_up`, `down`) before `commit` makes it visible."""

    layer: int
    expert: int
    slot: int
    gate_up: torch.Tensor
    down: torch.Tensor


class ExpertStore:
    def __init__(self, num_experts: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_experts = num_experts
        self.dtype = dtype
        self.device = torch.device(device)  # where the buffers live; slot maps stay on the CPU (index arithmetic)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a reservation ended
        self._buffers: dict[int, _Layer] = {}
        self._layers: dict[int, LayerExperts] = {}
        self._versions: dict[tuple[int, int], int] = {}
        self._state_ids: dict[tuple[int, int], int] = {}  # changes with an expert's weights or version
        self._next_state_id = itertools.count(1)
        self._generation = 0
        self._readers: Counter[int] = Counter()  # generation -> readers that entered at it

    # -- reading -----------------------------------------------------------

    def snapshot(self, layer: int) -> LayerExperts | None:
        """The layer's current snapshot; use its tensors inside `reading(layer)` only."""
        return self._layers.get(layer)

    @contextlib.contextmanager
    def reading(self, layer: int) -> Iterator[LayerExperts | None]:
        """The layer's snapshot, whose slots are not reused while the block runs."""
        with self._lock:
            generation = self._generation
            self._readers[generation] += 1
            snap = self._layers.get(layer)
        try:
            yield snap
        finally:
            with self._lock:
                self._readers[generation] -= 1
                if not self._readers[generation]:
                    del self._readers[generation]

    def pin(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, Callable[[], None]]:
        """Views of one held expert's slot (no copy), kept from reuse until `release()` (idempotent);
        KeyError when not held."""
        guard = self.reading(layer)
        snap = guard.__enter__()
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                guard.__exit__(None, None, None)

        if snap is None or expert not in snap.experts:
            release()
            raise KeyError((layer, expert))
        slot = snap.slot(expert)
        return snap.gate_up[slot], snap.down[slot], release

    def held(self) -> list[tuple[int, int]]:
        return sorted(self._versions)

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._versions

    def version(self, layer: int, expert: int) -> int:
        return self._versions[(layer, expert)]

    def state_id(self, layer: int, expert: int) -> int:
        """An id of the expert's current weights and version, never reused: equal ids, the very same state
        (0: not held)."""
        return self._state_ids.get((layer, expert), 0)

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of one expert's (2I, H) gate_up and (H, I) down; KeyError when not held."""
        with self.reading(layer) as snap:
            if snap is None or expert not in snap.experts:
                raise KeyError((layer, expert))
            slot = snap.slot(expert)
            return snap.gate_up[slot].clone(), snap.down[slot].clone()

    # -- changes -----------------------------------------------------------

    def reserve(self, layer: int, expert: int, shapes: tuple[tuple[int, ...], tuple[int, ...]],
                wait_s: float = 0.0) -> Reservation | None:
        """A free slot to receive (layer, expert) into, unseen by readers until `commit`; None when
        the expert is held.  While another pull of it is under way, waits up to `wait_s` for it
        to end (TimeoutError after)."""
        with self._changed:
            if not self._changed.wait_for(lambda: expert not in self._reserved_in(layer), wait_s):
                raise TimeoutError(f"expert {(layer, expert)} is still being received by another pull")
            if (layer, expert) in self._versions:
                return None
            buf = self._room(layer, shapes, 1)
            slot = buf.free.pop()
            buf.reserved[expert] = slot
            return Reservation(layer, expert, slot, buf.gate_up[slot], buf.down[slot])

    def _reserved_in(self, layer: int) -> dict[int, int]:
        buf = self._buffers.get(layer)
        return buf.reserved if buf is not None else {}

    def commit(self, res: Reservation, version: int = 0) -> None:
        """Makes a reservation's expert visible (copied over if the buffers grew meanwhile)."""
        with self._changed:
            self._changed.notify_all()
            buf = self._buffers[res.layer]
            del buf.reserved[res.expert]
            if buf.gate_up[res.slot].data_ptr() != res.gate_up.data_ptr():
                buf.gate_up[res.slot].copy_(res.gate_up)
                buf.down[res.slot].copy_(res.down)
            buf.slot_of[res.expert] = res.slot
            self._versions[(res.layer, res.expert)] = version
            self._state_ids[(res.layer, res.expert)] = next(self._next_state_id)
            self._publish(res.layer)

    def abort(self, res: Reservation) -> None:
        """Gives a reservation's slot back (no reader ever saw it)."""
        with self._changed:
            self._changed.notify_all()
            buf = self._buffers[res.layer]
            del buf.reserved[res.expert]
            buf.free.append(res.slot)

    def add(self, items: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]], version: int = 0) -> list[tuple[int, int]]:
        """Adds experts not yet held; returns those added. Shapes are the caller's to check."""
        with self._lock:
            added = [key for key in sorted(items) if key not in self._versions]
            for layer in sorted({layer for layer, _ in added}):
                new = [e for (l, e) in added if l == layer]
                first = items[(layer, new[0])]
                buf = self._room(layer, (first[0].shape, first[1].shape), len(new))
                for e in new:
                    slot = buf.free.pop()
                    gate_up, down = items[(layer, e)]
                    buf.gate_up[slot].copy_(gate_up)
                    buf.down[slot].copy_(down)
                    buf.slot_of[e] = slot
                self._publish(layer)
            for key in added:
                self._versions[key] = version
                self._state_ids[key] = next(self._next_state_id)
            return added

    def replace(self, layer: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor, version: int) -> None:
        """New weights and version for a held expert (a training update), copy on write: they go
        into a fresh slot and the old one is retired, so a reader mid-Forward keeps the old weights
        whole.  KeyError when not held."""
        with self._lock:
            if (layer, expert) not in self._versions:
                raise KeyError((layer, expert))
            buf = self._room(layer, (gate_up.shape, down.shape), 1)
            slot = buf.free.pop()
            buf.gate_up[slot].copy_(gate_up)
            buf.down[slot].copy_(down)
            buf.retired.append((self._generation + 1, buf.slot_of[expert]))
            buf.slot_of[expert] = slot
            self._versions[(layer, expert)] = version
            self._state_ids[(layer, expert)] = next(self._next_state_id)
            self._publish(layer)

    def drop(self, keys: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Drops held experts; returns those dropped (others are ignored: dropping is idempotent)."""
        with self._lock:
            dropped = [key for key in sorted(set(keys)) if key in self._versions]
            for layer in sorted({layer for layer, _ in dropped}):
                buf = self._buffers[layer]
                for _, e in (k for k in dropped if k[0] == layer):
                    buf.retired.append((self._generation + 1, buf.slot_of.pop(e)))
                self._publish(layer)
            for key in dropped:
                del self._versions[key]
                del self._state_ids[key]
            return dropped

    def _room(self, layer: int, shapes: tuple[tuple[int, ...], tuple[int, ...]], need: int) -> _Layer:
        """The layer's buffers with at least `need` free slots: reclaimed, or grown by half."""
        buf = self._buffers.get(layer)
        if buf is not None:
            oldest_reader = min(self._readers, default=self._generation + 1)
            buf.free += [slot for gen, slot in buf.retired if gen <= oldest_reader]
            buf.retired = [(gen, slot) for gen, slot in buf.retired if gen > oldest_reader]
            if len(buf.free) >= need:
                return buf
        old = buf.gate_up.shape[0] if buf is not None else 0
        size = max(MIN_SLOTS, old + need, old + old // 2)
        gate_up = torch.empty((size, *shapes[0]), dtype=self.dtype, device=self.device)
        down = torch.empty((size, *shapes[1]), dtype=self.dtype, device=self.device)
        if buf is None:
            buf = self._buffers[layer] = _Layer(gate_up, down, {}, [], [], {})
        else:  # readers of the old buffers keep them; nothing of theirs is overwritten
            gate_up[:old].copy_(buf.gate_up)
            down[:old].copy_(buf.down)
            buf.gate_up, buf.down = gate_up, down
        buf.free += list(range(size - 1, old - 1, -1))
        return buf

    def _publish(self, layer: int) -> None:
        self._generation += 1
        buf = self._buffers.get(layer)
        if buf is None or not buf.slot_of:
            self._layers.pop(layer, None)
            return
        experts = tuple(sorted(buf.slot_of))
        slots = tuple(buf.slot_of[e] for e in experts)
        slot_of = torch.full((self.num_experts + 1,), -1, dtype=torch.long)
        slot_of[torch.tensor(experts, dtype=torch.long)] = torch.tensor(slots, dtype=torch.long)
        self._layers[layer] = LayerExperts(experts, slots, buf.gate_up, buf.down, slot_of)
