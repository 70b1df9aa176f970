"""The routing table: which workers hold each (layer, expert), at which epoch.

The controller publishes it; frontends route by it. It is a value: a new
layout is a new table with a higher epoch, never an edit in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RoutingTable:
    epoch: int
    workers: dict[str, str]  # worker id -> "host:port"
    replicas: dict[tuple[int, int], tuple[str, ...]] = field(default_factory=dict)  # (layer, expert) -> worker ids
    paused: bool = False  # expert state is being copied: trainers start no step until it lifts

    def __post_init__(self) -> None:
        for key, holders in self.replicas.items():
            unknown = [w for w in holders if w not in self.workers]
            if unknown:
                raise ValueError(f"expert {key} is placed on unknown workers {unknown}")

    def holders(self, layer: int, expert: int) -> tuple[str, ...]:
        return self.replicas.get((layer, expert), ())

    def experts_of(self, worker_id: str) -> list[tuple[int, int]]:
        return sorted(k for k, holders in self.replicas.items() if worker_id in holders)

    def to_json(self) -> str:
        return json.dumps({
            "epoch": self.epoch,
            "workers": self.workers,
            "replicas": [[layer, expert, list(holders)] for (layer, expert), holders in sorted(self.replicas.items())],
        })

    @classmethod
    def from_json(cls, text: str) -> "RoutingTable":
        data = json.loads(text)
        replicas = {(int(l), int(e)): tuple(h) for l, e, h in data["replicas"]}
        return cls(int(data["epoch"]), dict(data["workers"]), replicas)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTable":
        return cls.from_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
