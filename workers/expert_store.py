"""The experts one worker holds, as immutable per-layer snapshots.

A Forward reads one snapshot and never sees a half-applied load or drop: a
change builds a new stacked snapshot and swaps it in under a lock. Stacking the
held experts of a layer ([n, 2I, H], [n, H, I]) is what lets the fused kernel
run them as one grouped computation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerExperts:
    """One layer's experts on this worker."""

    experts: tuple[int, ...]  # global expert ids, in slot order
    gate_up: torch.Tensor  # (n, 2I, H)
    down: torch.Tensor  # (n, H, I)
    slot_of: torch.Tensor  # (E + 1,) int64: global id -> slot, -1 where not held; entry E maps -1 to -1

    def local_index(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """(T, K) global ids (or -1) -> (T, K) int64 slots (or -1); -1 also for experts not held."""
        return self.slot_of[top_k_index.long()]


class ExpertStore:
    def __init__(self, num_experts: int, dtype: torch.dtype = torch.float32):
        self.num_experts = num_experts
        self.dtype = dtype
        self._lock = threading.Lock()
        self._layers: dict[int, LayerExperts] = {}
        self._versions: dict[tuple[int, int], int] = {}

    def snapshot(self, layer: int) -> LayerExperts | None:
        return self._layers.get(layer)

    def held(self) -> list[tuple[int, int]]:
        return sorted(self._versions)

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._versions

    def version(self, layer: int, expert: int) -> int:
        return self._versions[(layer, expert)]

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's (2I, H) gate_up and (H, I) down; KeyError when not held."""
        snap = self._layers.get(layer)
        if snap is None or expert not in snap.experts:
            raise KeyError((layer, expert))
        slot = snap.experts.index(expert)
        return snap.gate_up[slot], snap.down[slot]

    def add(self, items: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]], version: int = 0) -> list[tuple[int, int]]:
        """Adds experts not yet held; returns those added. Shapes are the caller's to check."""
        with self._lock:
            added = [key for key in sorted(items) if key not in self._versions]
            for layer in sorted({layer for layer, _ in added}):
                snap = self._layers.get(layer)
                new = [e for (l, e) in added if l == layer]
                experts = (snap.experts if snap else ()) + tuple(new)
                gate_up = torch.stack([items[(layer, e)][0].to(self.dtype) for e in new])
                down = torch.stack([items[(layer, e)][1].to(self.dtype) for e in new])
                if snap is not None:  # [n, 2I, H] + [m, 2I, H] -> [n + m, 2I, H]
                    gate_up = torch.cat([snap.gate_up, gate_up])
                    down = torch.cat([snap.down, down])
                self._layers[layer] = self._stack(experts, gate_up, down)
            for key in added:
                self._versions[key] = version
            return added

    def drop(self, keys: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Drops held experts; returns those dropped (others are ignored: dropping is idempotent)."""
        with self._lock:
            dropped = [key for key in sorted(set(keys)) if key in self._versions]
            for layer in sorted({layer for layer, _ in dropped}):
                snap = self._layers[layer]
                gone = {e for (l, e) in dropped if l == layer}
                keep = [slot for slot, e in enumerate(snap.experts) if e not in gone]
                if not keep:
                    del self._layers[layer]
                    continue
                experts = tuple(snap.experts[s] for s in keep)
                index = torch.tensor(keep)
                self._layers[layer] = self._stack(experts, snap.gate_up[index], snap.down[index])
            for key in dropped:
                del self._versions[key]
            return dropped

    def _stack(self, experts: tuple[int, ...], gate_up: torch.Tensor, down: torch.Tensor) -> LayerExperts:
        slot_of = torch.full((self.num_experts + 1,), -1, dtype=torch.long)
        slot_of[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))
        return LayerExperts(experts, gate_up.contiguous(), down.contiguous(), slot_of)
