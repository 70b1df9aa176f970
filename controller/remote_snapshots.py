"""The snapshot directory, seen through a worker.

It is the workers' storage (shared by them: a volume of the worker pods on Kubernetes, a path on
every worker node on Ray), which the controller may not mount. So the controller never touches it:
a worker it names seals, discards and lists snapshot folders for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.workers.snapshot_folders import Snapshot, from_message

log = logging.getLogger("moecluster.controller")
TIMEOUT_S = 60.0


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
    found = worker.ListSnapshots(worker_pb2.ListSnapshotsRequest(path=path), timeout=TIMEOUT_S).snapshots
    if not found:
        raise ValueError(f"{path}: no snapshot there (a step-NNNNNNNN folder with a manifest.json, or a folder of "
                         "them), as the workers see it")
    return [from_message(m) for m in found]
