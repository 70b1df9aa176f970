"""One expert's training state as a file: weights, AdamW moments, version.

A safetensors file per expert (`layer-L-expert-E.safetensors`), written whole
to a temporary name and renamed, with the xxh3-64 digest of its bytes returned
for the snapshot's manifest.  Reading checks size and digest before parsing, so
a torn or altered file is refused (SnapshotError) instead of loaded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

MOMENT_NAMES = ("exp_avg.gate_up_proj", "exp_avg.down_proj", "exp_avg_sq.gate_up_proj", "exp_avg_sq.down_proj")


class SnapshotError(ValueError):
    """A snapshot file is missing, torn or not what its manifest says."""


@dataclass(frozen=True)
class ExpertState:
    layer: int
    expert: int
    version: int
    gate_up: torch.Tensor  # (2I, H)
    down: torch.Tensor  # (H, I)
    moments: tuple[torch.Tensor, ...] | None  # MOMENT_NAMES' order; None before the first update


@dataclass(frozen=True)
class FileInfo:
    file: str
    version: int
    digest: int
    bytes: int


def file_name(layer: int, expert: int) -> str:
    return f"layer-{layer}-expert-{expert}.safetensors"


def write_expert(directory: str | Path, state: ExpertState) -> FileInfo:
    tensors = {"gate_up_proj": state.gate_up.to("cpu").contiguous(), "down_proj": state.down.to("cpu").contiguous()}
    if state.moments is not None:
        tensors |= {name: m.to("cpu").contiguous() for name, m in zip(MOMENT_NAMES, state.moments)}
    meta = {"layer": str(state.layer), "expert": str(state.expert), "version": str(state.version)}
    data = save_bytes(tensors, metadata=meta)
    name = file_name(state.layer, state.expert)
    path = Path(directory) / name
    tmp = path.with_name(f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return FileInfo(name, state.version, xxhash.xxh3_64_intdigest(data), len(data))


def read_expert(directory: str | Path, info: FileInfo, layer: int, expert: int) -> ExpertState:
    """The state in `info.file`, if its bytes match the manifest's size and digest."""
    path = Path(directory) / info.file
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SnapshotError(f"{path}: {err.strerror or err}") from None
    if len(data) != info.bytes or xxhash.xxh3_64_intdigest(data) != info.digest:
        raise SnapshotError(f"{path}: {len(data)} bytes whose digest does not match the manifest "
                            f"({info.bytes} bytes): torn or altered, refused")
    try:
        tensors = load_bytes(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, KeyError) as err:
        raise SnapshotError(f"{path}: not a snapshot file: {err}") from None
    if (int(meta.get("layer", -1)), int(meta.get("expert", -1))) != (layer, expert):
        raise SnapshotError(f"{path}: holds expert ({meta.get('layer')}, {meta.get('expert')}), not {(layer, expert)}")
    moments = tuple(tensors[n] for n in MOMENT_NAMES) if MOMENT_NAMES[0] in tensors else None
    return ExpertState(layer, expert, int(meta["version"]), tensors["gate_up_proj"], tensors["down_proj"], moments)


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (the format: 8-byte little-endian size, then JSON)."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]).get("__metadata__", {})
