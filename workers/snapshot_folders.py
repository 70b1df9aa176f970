"""Snapshots of a trained pool's experts on disk: one folder per step, a manifest, files checked by digest.

The snapshot directory is the workers' storage (shared by all of them: a volume on Kubernetes):
workers write and read the files, and one of them seals, discards and lists folders for the
controller, which may run where the directory is not mounted (the `*_request` answers below).

    DIR/step-00000012/manifest.json                 {"step": 12, "experts": [{layer, expert, file, version, digest, bytes}]}
    DIR/step-00000012/layer-0-expert-3.safetensors  written by the worker that held the expert

Workers write the files into a `.partial-*` folder; the manifest goes in last and
the folder is renamed into place, so a snapshot either exists whole or not at all.
A trainer may add its own state beside the experts' (`sdk/trainer_state.py`).
A file torn or altered afterwards is caught by its digest when a worker reads it
(and refused); the restore then falls back to the snapshot before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from moecluster.protos import worker_pb2
from moecluster.workers.request_error import RequestError, invalid

_NAME = re.compile(r"^step-(\d{8,})$")
PARTIAL_PREFIX = ".partial-"
PARTIAL_STALE_S = 3600.0  # an unsealed folder this old is a snapshot that was cut off (no snapshot takes an hour)
TRAINER_FILE = "trainer.pt"  # a trainer's half of a snapshot (sdk/trainer_state.py)
ExpertKey = tuple[int, int]


@dataclass(frozen=True)
class Snapshot:
    step: int
    path: Path
    files: dict[ExpertKey, worker_pb2.SnapshotFile]


def partial_dir(root: str | Path) -> Path:
    """A fresh folder for workers to write a snapshot's files into."""
    path = Path(partial_name(root))
    path.mkdir(parents=True)
    return path


def partial_name(root: str | Path) -> str:
    """A fresh name for a folder to write a snapshot's files into (WriteSnapshot makes it)."""
    return str(Path(root) / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}")


def seal(partial: Path, step: int, files: list[worker_pb2.SnapshotFile]) -> Snapshot:
    """Writes the manifest and renames the folder to step-NNNNNNNN (replacing an older one of that step)."""
    doc = {"step": step, "experts": [{"layer": f.expert.layer, "expert": f.expert.expert, "file": f.file,
                                      "version": f.version, "digest": f.digest, "bytes": f.bytes} for f in files]}
    (partial / "manifest.json").write_text(json.dumps(doc, indent=1))
    final = partial.parent / f"step-{step:08d}"
    if final.exists():
        _keep_companions(final, partial, files)
        shutil.rmtree(final)
    partial.rename(final)
    return read(final)


def prune(root: str | Path, keep: int) -> list[Path]:
    """Removes every snapshot under `root` but the newest `keep` and the newest holding a trainer's state
    (the one a resume needs), and unsealed folders left by a snapshot cut off long ago; returns those removed."""
    found = newest_first(root)
    kept = {s.path for s in found[:keep]}
    with_trainer = next((s.path for s in found if (s.path / TRAINER_FILE).is_file()), None)
    if with_trainer is not None:
        kept.add(with_trainer)
    removed = [s.path for s in found if s.path not in kept]
    now = time.time()
    removed += sorted(p for p in Path(root).glob(f"{PARTIAL_PREFIX}*")
                      if p.is_dir() and now - p.stat().st_mtime > PARTIAL_STALE_S)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _keep_companions(old: Path, new: Path, files: list[worker_pb2.SnapshotFile]) -> None:
    """Files beside the experts' (the trainer's state) move into the replacing snapshot when its experts'
    state is the very same (every file's digest equal); a snapshot of another history drops them."""
    try:
        before = {k: f.digest for k, f in read(old).files.items()}
    except ValueError:
        return
    if before != {(f.expert.layer, f.expert.expert): f.digest for f in files}:
        return
    named = {f.file for f in files} | {"manifest.json"}
    for path in old.iterdir():
        if path.is_file() and path.name not in named:
            path.rename(new / path.name)


def read(path: str | Path) -> Snapshot:
    """The snapshot in `path`; ValueError when its manifest is missing or malformed."""
    path = Path(path)
    try:
        doc = json.loads((path / "manifest.json").read_text())
        files = {(e["layer"], e["expert"]): worker_pb2.SnapshotFile(
            expert=worker_pb2.ExpertKey(layer=e["layer"], expert=e["expert"]), file=e["file"], version=e["version"],
            digest=e["digest"], bytes=e["bytes"]) for e in doc["experts"]}
        return Snapshot(int(doc["step"]), path, files)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: no readable snapshot manifest ({err})") from None


def newest_first(root: str | Path) -> list[Snapshot]:
    """Every sealed snapshot under `root` with a readable manifest, the newest first."""
    root = Path(root)
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        if _NAME.match(path.name):
            try:
                found.append(read(path))
            except ValueError:
                continue
    return sorted(found, key=lambda s: s.step, reverse=True)


def candidates(path: str | Path) -> list[Snapshot]:
    """What a restore from `path` may use: the snapshot in it, or else every one under it (the newest
    first, so one torn can fall back to the one before). ValueError when there is none."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return [read(path)]
    found = newest_first(path)
    if not found:
        raise ValueError(f"{path}: no snapshot there (a step-NNNNNNNN folder with a manifest.json, or a folder of them)")
    return found


def discard(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


def manifest_message(snap: Snapshot) -> worker_pb2.SnapshotManifest:
    return worker_pb2.SnapshotManifest(step=snap.step, path=str(snap.path), files=list(snap.files.values()),
                                       trainer_state=(snap.path / TRAINER_FILE).is_file())


def from_message(m: worker_pb2.SnapshotManifest) -> Snapshot:
    return Snapshot(m.step, Path(m.path), {(f.expert.layer, f.expert.expert): f for f in m.files})


# -- what a worker answers ---------------------------------------------------------------

def seal_request(request: worker_pb2.SealSnapshotRequest) -> worker_pb2.SealSnapshotResponse:
    try:
        path = seal(_partial(request.directory), request.step, list(request.files)).path
    except OSError as err:
        raise RequestError(grpc.StatusCode.INTERNAL, f"sealing {request.directory}: {err}") from None
    removed = prune(path.parent, request.keep) if request.keep else []
    return worker_pb2.SealSnapshotResponse(path=str(path), removed=[str(p) for p in removed])


def discard_request(request: worker_pb2.DiscardSnapshotRequest) -> worker_pb2.DiscardSnapshotResponse:
    discard(_partial(request.directory))
    return worker_pb2.DiscardSnapshotResponse()


def list_request(request: worker_pb2.ListSnapshotsRequest) -> worker_pb2.ListSnapshotsResponse:
    """What a restore from `path` may use (`candidates`), none when there is no snapshot there; with
    `writable`, INVALID_ARGUMENT unless `path` is a directory this worker can write into."""
    if request.writable and not (os.path.isdir(request.path) and os.access(request.path, os.W_OK | os.X_OK)):
        what = "is not writable" if os.path.isdir(request.path) else "is not a directory"
        raise invalid(f"path: {request.path!r} {what} on this worker (it is not made: a path that misses the "
                      "mounted volume would keep snapshots only as long as the worker lives)")
    try:
        found = candidates(request.path)
    except ValueError:
        found = []
    return worker_pb2.ListSnapshotsResponse(snapshots=[manifest_message(s) for s in found])


def _partial(directory: str) -> Path:
    """Only a folder made for a snapshot may be sealed (renamed) or discarded (deleted)."""
    path = Path(directory)
    if not path.name.startswith(PARTIAL_PREFIX) or not path.is_dir():
        raise invalid(f"directory: {directory!r} is not a {PARTIAL_PREFIX}* snapshot folder on this worker")
    return path
