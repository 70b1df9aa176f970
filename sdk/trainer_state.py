"""The trainer's half of a training snapshot: the dense model's weights and its optimizer's state.

    DIR/step-00000012/manifest.json        the experts' half (written by the controller and workers)
    DIR/step-00000012/trainer.pt           {"step": 12, "model": dense state_dict, "optimizer": AdamW state_dict}

The snapshot directory is the workers' storage: the trainer sends its file to a worker, which
renames it into the sealed snapshot once whole (`workers/trainer_files.py`), and reads it back
through one. So a snapshot with a `trainer.pt` has both halves of the same step whole, and the
trainer needs no access to the directory.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import streaming
from moecluster.workers import trainer_files

FILE = trainer_files.FILE


@dataclass(frozen=True)
class TrainerState:
    step: int
    path: Path  # the snapshot folder, as the workers see it
    model: dict[str, torch.Tensor]
    optimizer: dict


def encode(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bytes:
    """The file's bytes (made once: a write that fails over to another worker sends them again)."""
    doc = {"step": step, "model": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
           "optimizer": optimizer.state_dict()}
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    return buffer.getvalue()


def write(worker: worker_pb2_grpc.ExpertWorkerStub, folder: str | Path, step: int, payload: bytes, timeout: float) -> str:
    """Stores `payload` (from `encode`) in the sealed snapshot `folder` of `step`; returns the file's path."""
    chunks = streaming.split(payload)
    first = worker_pb2.TrainerStatePart(path=str(folder), step=step, chunk=next(chunks))
    parts = itertools.chain([first], (worker_pb2.TrainerStatePart(chunk=c) for c in chunks))
    return worker.WriteTrainerState(parts, timeout=timeout).file


def read(worker: worker_pb2_grpc.ExpertWorkerStub, path: str | Path, timeout: float) -> TrainerState:
    """The trainer state in a snapshot folder, or in the newest snapshot under `path` that has one.
    grpc.RpcError when there is none (NOT_FOUND); ValueError when it is torn or of another step."""
    parts: Iterator[worker_pb2.TrainerStatePart] = worker.ReadTrainerState(
        worker_pb2.ReadTrainerStateRequest(path=str(path)), timeout=timeout)
    first = next(parts)
    folder = Path(first.path)
    payload = streaming.join(itertools.chain([first.chunk], (p.chunk for p in parts)), limit_bytes=trainer_files.MAX_BYTES)
    try:
        doc = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a torn or foreign file
        raise ValueError(f"{folder / FILE}: unreadable ({type(err).__name__}: {err})") from None
    if doc.get("step") != first.step:
        raise ValueError(f"{folder / FILE} is of step {doc.get('step')}, its snapshot of step {first.step}")
    return TrainerState(first.step, folder, doc["model"], doc["optimizer"])
