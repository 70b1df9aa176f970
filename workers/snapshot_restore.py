"""Restoring experts from a snapshot, reading only the files whose state this worker does not hold.

A group of trainers that restarts (`moectl train --resume auto`) often resumes from the save it wrote
just before: the pool is already in that state, and reading, checking and copying every file would
change nothing. So a worker remembers, per expert, the file (by its digest) its current state was
written to or read from. An expert whose state has not changed since (the store's state id), at the
version the restore sets, keeps its state: nothing is read for it, and its pending gradients and
stored acknowledgements go as in any restore.
"""

from __future__ import annotations

import threading

import grpc
from moecluster.models.checkpoint import Geometry
from moecluster.protos import worker_pb2
from moecluster.workers import validation
from moecluster.workers.expert_store import ExpertStore
from moecluster.workers.expert_training import ExpertTraining
from moecluster.workers.request_error import RequestError
from moecluster.workers.snapshot_files import ExpertState, FileInfo, SnapshotError, read_expert

Key = tuple[int, int]


class SnapshotRestorer:
    def __init__(self, geometry: Geometry, store: ExpertStore, training: ExpertTraining):
        self.geometry, self.store, self.training = geometry, store, training
        self._lock = threading.Lock()
        self._same_as: dict[Key, tuple[int, int]] = {}  # expert -> (file digest, state id) that are one state

    def remember(self, key: Key, digest: int, state_id: int) -> None:
        """The expert's state `state_id` is the one in the snapshot file of `digest` (written or read)."""
        with self._lock:
            self._same_as[key] = (digest, state_id)

    def holds(self, key: Key, digest: int, version: int) -> bool:
        """Whether the expert is now in the state of the file of `digest`, at `version`."""
        with self._lock:
            same = self._same_as.get(key)
        state_id = self.store.state_id(*key)
        try:
            return same == (digest, state_id) and state_id != 0 and self.store.version(*key) == version
        except KeyError:  # dropped in between
            return False

    def restore(self, request: worker_pb2.RestoreExpertsRequest) -> worker_pb2.RestoreExpertsResponse:
        """Every file's expert at `resume_version`: all files are read and checked before anything changes
        (DATA_LOSS for a torn one), but for the experts that already hold their file's state."""
        keys = [validation.check_expert_key(self.geometry, f.expert) for f in request.files]
        states: dict[Key, ExpertState] = {}
        for f, key in zip(request.files, keys):
            if not self.holds(key, f.digest, request.resume_version):
                states[key] = self._read(request.directory, f, key)
        with self.training.lock:
            for f, key in zip(request.files, keys):  # a state that changed since the look above is read now
                if key not in states and not self.holds(key, f.digest, request.resume_version):
                    states[key] = self._read(request.directory, f, key)
            for f, key in zip(request.files, keys):
                state = states.get(key)
                if state is None:
                    self.training.adopt(key, self.training.moments(key))  # kept: no pending gradient, no old acks
                    continue
                if self.store.holds(*key):  # a pool rolled back: copy on write, a reader mid-Forward keeps the old
                    self.store.replace(*key, state.gate_up, state.down, version=request.resume_version)
                else:
                    self.store.add({key: (state.gate_up, state.down)}, version=request.resume_version)
                self.training.adopt(key, state.moments)
                self.remember(key, f.digest, self.store.state_id(*key))
        read = sum(f.bytes for f, key in zip(request.files, keys) if key in states)
        return worker_pb2.RestoreExpertsResponse(restored=[f.expert for f in request.files], bytes_read=read)

    def _read(self, directory: str, f: worker_pb2.SnapshotFile, key: Key) -> ExpertState:
        try:
            state = read_expert(directory, FileInfo(f.file, f.version, f.digest, f.bytes), *key)
        except SnapshotError as err:
            raise RequestError(grpc.StatusCode.DATA_LOSS, str(err)) from None
        g = self.geometry
        if state.gate_up.shape != (2 * g.intermediate, g.hidden) or state.down.shape != (g.hidden, g.intermediate):
            raise RequestError(grpc.StatusCode.DATA_LOSS, f"{f.file}: shapes do not fit this model")
        return state
