"""A trainer's half of a snapshot, stored and read back by a worker.

    DIR/step-00000012/trainer.pt    the dense model's weights and optimizer state (sdk/trainer_state.py)

The snapshot directory is the workers' storage, so a trainer (a Job that mounts nothing, a laptop)
sends its file to a worker and reads it back through one. To the worker it is opaque bytes: it
checks that the folder is a sealed snapshot of the step the trainer names, writes the chunks to a
temporary name as they arrive (a dense model may not fit in a worker's memory beside its experts)
and renames the file into place once its checksum passed, so a snapshot's trainer.pt is whole or
absent. The trainer checks the step written inside it when it reads it back.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import grpc
from moecluster.protos import worker_pb2
from moecluster.wire import streaming
from moecluster.workers import snapshot_folders
from moecluster.workers.request_error import RequestError, invalid

FILE = snapshot_folders.TRAINER_FILE
MAX_BYTES = 1 << 40


def write_request(parts: Iterator[worker_pb2.TrainerStatePart]) -> worker_pb2.WriteTrainerStateResponse:
    """Stores the file the parts carry in the snapshot the first part names."""
    first = next(parts, None)
    if first is None:
        raise invalid("no parts: the first names the snapshot (path, step)")
    folder = _sealed(first.path, first.step).path
    partial = folder / f".{FILE}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(partial, "wb") as out:
            size = streaming.join_into((p.chunk for p in itertools.chain([first], parts)), out, limit_bytes=MAX_BYTES)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, folder / FILE)
    except OSError as err:
        raise RequestError(grpc.StatusCode.INTERNAL, f"writing {folder / FILE}: {err}") from None
    finally:
        partial.unlink(missing_ok=True)  # a stream cut off or corrupted leaves nothing behind
    return worker_pb2.WriteTrainerStateResponse(file=str(folder / FILE), bytes=size)


def open_request(request: worker_pb2.ReadTrainerStateRequest) -> tuple[snapshot_folders.Snapshot, BinaryIO, int]:
    """The snapshot whose trainer file a read sends (the one named, or the newest with one under the
    folder named), that file opened, its size. Errors before a byte is sent."""
    path = Path(request.path)
    if (path / "manifest.json").exists():
        snap = _sealed(request.path)
        if not (path / FILE).is_file():
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"{path}: the experts' snapshot has no {FILE}: `moectl "
                               "restore` rolls the experts back; the dense model then starts from the checkpoint")
    else:
        with_state = [s for s in snapshot_folders.newest_first(path) if (s.path / FILE).is_file()]
        if not with_state:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"{path}: no snapshot with a {FILE} (TrainingSession.save "
                               "or `moectl train --save-every` write one; `moectl snapshot` saves the experts only)")
        snap = with_state[0]
    try:
        file = open(snap.path / FILE, "rb")  # an open file outlives a prune that removes the folder meanwhile
    except OSError as err:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"{snap.path / FILE}: {err}") from None
    return snap, file, os.fstat(file.fileno()).st_size


def parts(snap: snapshot_folders.Snapshot, file: BinaryIO, size: int) -> Iterator[worker_pb2.TrainerStatePart]:
    """The opened file as parts, read as they are sent; the first names its snapshot."""
    with file:
        for i, chunk in enumerate(streaming.split_reader(file, size)):
            if i == 0:
                yield worker_pb2.TrainerStatePart(path=str(snap.path), step=snap.step, chunk=chunk)
            else:
                yield worker_pb2.TrainerStatePart(chunk=chunk)


def _sealed(path: str, step: int | None = None) -> snapshot_folders.Snapshot:
    try:
        snap = snapshot_folders.read(path)
    except ValueError as err:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"{err}: a trainer's state goes into a sealed snapshot") from None
    if step is not None and snap.step != step:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"{path} is the snapshot of step {snap.step}, not of step {step}")
    return snap
