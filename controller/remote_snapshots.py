"""The snapshot directory, seen through a worker.

It is the workers' storage (shared by them: a volume of the worker pods on Kubernetes, a path on
every worker node on Ray), which the controller may not mount. So the controller never touches it:
a worker it names seals, discards and lists snapshot folders for it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.workers.snapshot_folders import Snapshot, from_message

log = logging.getLogger("moecluster.controller")
TIMEOUT_S = 60.0
LIST_EVERY_S = 5.0  # how stale status's list may be (a trainer's save lands in it between two listings)
LIST_TIMEOUT_S = 2.0  # status must not hang on a slow worker: the previous list stands meanwhile


def seal(worker: worker_pb2_grpc.ExpertWorkerStub, partial: str, step: int, files: list[worker_pb2.SnapshotFile],
         keep: int = 0) -> Snapshot:
    """Makes the folder the experts' files were written into the snapshot of `step` (manifest, rename); then,
    with `keep`, removes all older snapshots but the newest `keep` and the newest holding a trainer's state."""
    sealed = worker.SealSnapshot(worker_pb2.SealSnapshotRequest(directory=partial, step=step, files=files, keep=keep),
                                 timeout=TIMEOUT_S)
    if sealed.removed:
        log.info("snapshots removed (keeping %d): %s", keep, list(sealed.removed))
    return Snapshot(step, Path(sealed.path), {(f.expert.layer, f.expert.expert): f for f in files})


def discard(worker: worker_pb2_grpc.ExpertWorkerStub, partial: str) -> None:
    """Removes an unsealed folder; best effort (a left-over `.partial-*` folder is never read)."""
    try:
        worker.DiscardSnapshot(worker_pb2.DiscardSnapshotRequest(directory=partial), timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        log.warning("could not remove the unfinished snapshot %s: %s", partial, err.details() or err.code().name)


def candidates(worker: worker_pb2_grpc.ExpertWorkerStub, path: str) -> list[Snapshot]:
    """What a restore from `path` may use: the snapshot in it, or else every one under it, the newest
    first. ValueError when there is none."""
    found = listed(worker, path)
    if not found:
        raise ValueError(f"{path}: no snapshot there (a step-NNNNNNNN folder with a manifest.json, or a folder of "
                         "them), as the workers see it")
    return [from_message(m) for m in found]


def listed(worker: worker_pb2_grpc.ExpertWorkerStub, path: str, timeout: float = TIMEOUT_S,
           writable: bool = False) -> list[worker_pb2.SnapshotManifest]:
    """The snapshot in `path`, or else every one under it, the newest first (none: an empty list); with
    `writable`, grpc.RpcError (INVALID_ARGUMENT) unless `path` is a directory the worker can write into."""
    request = worker_pb2.ListSnapshotsRequest(path=path, writable=writable)
    return list(worker.ListSnapshots(request, timeout=timeout).snapshots)


def summary(m: worker_pb2.SnapshotManifest) -> dict:
    return {"step": m.step, "path": m.path, "experts": len(m.files), "bytes": sum(f.bytes for f in m.files),
            "trainer_state": m.trainer_state}


class Listing:
    """The snapshot directory's contents for status: listed through a worker at most every LIST_EVERY_S
    (status is polled, and a listing reads every manifest), the previous list kept while none answers."""

    def __init__(self) -> None:
        self._listed_at = -math.inf
        self._found: list[dict] = []

    def get(self, workers: Iterable[worker_pb2_grpc.ExpertWorkerStub], root: str, now: bool = False) -> list[dict]:
        """[{step, path, experts, bytes, trainer_state}], the newest first; listed again when `now`."""
        if not root or (not now and time.monotonic() - self._listed_at < LIST_EVERY_S):
            return self._found
        for worker in workers:
            try:
                found = listed(worker, root, timeout=LIST_TIMEOUT_S)
            except grpc.RpcError:
                continue
            self._found = [summary(m) for m in found]
            self._listed_at = time.monotonic()
            break
        return self._found

    def changed(self) -> None:
        """A snapshot was sealed (and older ones pruned) or restored: list again on the next call."""
        self._listed_at = -math.inf
