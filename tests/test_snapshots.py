"""Snapshot folders on disk: which ones a restore may use, the trainer's state beside the experts', and a
real worker sealing, listing and discarding them for the controller and storing a trainer's state (neither
needs to see the directory)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
import torch
from moecluster.controller import remote_snapshots
from moecluster.protos import worker_pb2
from moecluster.sdk import trainer_state
from moecluster.wire import streaming
from moecluster.workers import snapshot_folders
from moecluster.workers.snapshot_folders import TRAINER_FILE
from shared import running_workers
from worker_helpers import keys, stub_for


def files(step: int, digest: int = 1) -> list[worker_pb2.SnapshotFile]:
    return [worker_pb2.SnapshotFile(expert=worker_pb2.ExpertKey(layer=0, expert=e), file=f"layer-0-expert-{e}.safetensors",
                                    version=step, digest=digest + e, bytes=10) for e in range(2)]


def sealed(root, step: int, digest: int = 1) -> snapshot_folders.Snapshot:
    partial = snapshot_folders.partial_dir(root)
    for f in files(step, digest):
        (partial / f.file).write_bytes(b"x" * 10)
    return snapshot_folders.seal(partial, step, files(step, digest))


def test_a_restore_uses_the_snapshot_named_or_else_the_newest_first(tmp_path):
    with pytest.raises(ValueError, match="no snapshot there"):
        snapshot_folders.candidates(tmp_path)
    two, _ = sealed(tmp_path, 2), sealed(tmp_path, 5)
    (tmp_path / "step-00000009").mkdir()  # no manifest: not a snapshot (a torn seal)
    assert [s.step for s in snapshot_folders.candidates(tmp_path)] == [5, 2]
    assert [s.path for s in snapshot_folders.candidates(two.path)] == [two.path]


def test_the_trainers_state_survives_a_resnapshot_of_the_same_state_only(tmp_path):
    first = sealed(tmp_path, 3)
    (first.path / TRAINER_FILE).write_bytes(b"dense state")
    sealed(tmp_path, 3)  # the same experts' state again (a `moectl snapshot` at the same step boundary)
    assert (first.path / TRAINER_FILE).read_bytes() == b"dense state"
    sealed(tmp_path, 3, digest=7)  # step 3 of another history (trained again after a rollback)
    assert not (first.path / TRAINER_FILE).exists()


def test_pruning_keeps_the_newest_and_the_newest_a_resume_can_use(tmp_path):
    for step in (1, 2, 3, 4, 5, 6):
        snap = sealed(tmp_path, step)
        if step in (2, 3):
            (snap.path / TRAINER_FILE).write_bytes(b"dense state")
    removed = snapshot_folders.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000002", "step-00000004"]
    assert [s.step for s in snapshot_folders.newest_first(tmp_path)] == [6, 5, 3]  # 3: the newest with trainer.pt
    assert snapshot_folders.prune(tmp_path, keep=2) == []
    stale, fresh = snapshot_folders.partial_dir(tmp_path), snapshot_folders.partial_dir(tmp_path)
    old = time.time() - snapshot_folders.PARTIAL_STALE_S - 60
    os.utime(stale, (old, old))  # a snapshot cut off long ago; `fresh` may be one being written now
    assert snapshot_folders.prune(tmp_path, keep=2) == [stale] and fresh.is_dir()


def test_a_worker_stores_a_trainers_state_in_a_sealed_snapshot_and_reads_back_the_newest(qwen3, tmp_path):
    """The trainer never opens the directory: its file goes to a worker in chunks (several here) and back."""
    model = torch.nn.Linear(600, 600, bias=False)  # 1.4 MB of weights, 4.3 MB with AdamW's moments
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 600)).sum().backward()
    opt.step()
    payload = lambda step: trainer_state.encode(step, model, opt)  # noqa: E731
    with running_workers(qwen3, {(0, 0): ("w",)}) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            def refused(call) -> grpc.RpcError:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                return err.value

            err = refused(lambda: trainer_state.read(stub, tmp_path, 30))
            assert err.code() == grpc.StatusCode.NOT_FOUND and "no snapshot with a trainer.pt" in err.details()
            four = sealed(tmp_path, 4)
            assert trainer_state.write(stub, four.path, 4, payload(4), 30) == str(four.path / TRAINER_FILE)
            six = sealed(tmp_path, 6)  # the experts only
            state = trainer_state.read(stub, tmp_path, 30)
            assert (state.step, state.path) == (4, four.path)
            assert torch.equal(state.model["weight"], model.weight.detach())
            assert torch.equal(state.optimizer["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
            err = refused(lambda: trainer_state.read(stub, six.path, 30))
            assert err.code() == grpc.StatusCode.NOT_FOUND and "has no trainer.pt" in err.details()

            err = refused(lambda: trainer_state.write(stub, six.path, 5, payload(5), 30))  # another trainer's step
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "of step 6, not of step 5" in err.details()
            err = refused(lambda: trainer_state.write(stub, tmp_path, 6, payload(6), 30))  # not a sealed snapshot
            assert err.code() == grpc.StatusCode.NOT_FOUND
            chunks = [worker_pb2.TrainerStatePart(chunk=c) for c in streaming.split(b"x" * (3 << 20))]
            chunks[0].path, chunks[0].step = str(six.path), 6
            corrupted = [chunks[0], worker_pb2.TrainerStatePart(), *chunks[2:]]
            corrupted[1].CopyFrom(chunks[1])
            corrupted[1].chunk.data = b"y" * len(chunks[1].chunk.data)  # changed in transit
            for parts in (corrupted, chunks[:1]):  # and a stream cut off after its first chunk
                err = refused(lambda: stub.WriteTrainerState(iter(parts), timeout=30))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert sorted(p.name for p in six.path.iterdir() if not p.name.endswith(".safetensors")) == \
                    ["manifest.json"], "nothing of a failed write is left"

            torch.save({"step": 7, "model": {}, "optimizer": {}}, six.path / TRAINER_FILE)  # another step's state
            with pytest.raises(ValueError, match="is of step 7, its snapshot of step 6"):
                trainer_state.read(stub, six.path, 30)
            torn = four.path / TRAINER_FILE
            torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
            with pytest.raises(ValueError, match="unreadable"):
                trainer_state.read(stub, four.path, 30)


def test_a_worker_seals_lists_and_discards_snapshot_folders_for_the_controller(qwen3, tmp_path):
    with running_workers(qwen3, {(0, e): ("w",) for e in range(2)}) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            def write(directory):
                return list(stub.WriteSnapshot(worker_pb2.WriteSnapshotRequest(
                    directory=directory, experts=keys((0, 0), (0, 1))), timeout=30).files)

            partial = snapshot_folders.partial_name(tmp_path)
            files = write(partial)  # the worker makes the folder
            with pytest.raises(grpc.RpcError) as err:  # only a folder made for a snapshot is renamed
                stub.SealSnapshot(worker_pb2.SealSnapshotRequest(directory=str(tmp_path), step=0, files=files))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ".partial-" in err.value.details()
            snap = remote_snapshots.seal(stub, partial, 0, files)
            assert snap.path == tmp_path / "step-00000000" and (snap.path / "manifest.json").is_file()
            assert [(s.step, s.path, sorted(s.files)) for s in remote_snapshots.candidates(stub, str(tmp_path))] == \
                [(0, snap.path, [(0, 0), (0, 1)])]
            with pytest.raises(ValueError, match="no snapshot there"):
                remote_snapshots.candidates(stub, str(tmp_path / "nowhere"))
            listing = remote_snapshots.Listing()  # status's list: listed again only when stale, changed or asked
            assert [x["step"] for x in listing.get([stub], str(tmp_path))] == [0]
            (sealed(tmp_path, 1).path / TRAINER_FILE).write_bytes(b"dense state")
            assert [x["step"] for x in listing.get([stub], str(tmp_path))] == [0]
            assert [(x["step"], x["trainer_state"]) for x in listing.get([stub], str(tmp_path), now=True)] == \
                [(1, True), (0, False)]
            shutil.rmtree(tmp_path / "step-00000001")
            listing.changed()
            assert [x["step"] for x in listing.get([stub], str(tmp_path))] == [0]
            other = snapshot_folders.partial_name(tmp_path)
            write(other)
            remote_snapshots.discard(stub, other)
            assert not Path(other).exists() and snap.path.is_dir()
            with pytest.raises(grpc.RpcError) as err:
                write(str(tmp_path / "no" / "such" / "parent"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_worker_says_whether_a_save_directory_is_one_it_can_write_into(qwen3, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with running_workers(qwen3, {(0, 0): ("w",)}) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            assert remote_snapshots.listed(stub, str(tmp_path), writable=True) == []
            for path in (tmp_path / "no" / "such", tmp_path / "a-file", ""):
                assert remote_snapshots.listed(stub, str(path)) == []  # a plain listing finds nothing
                with pytest.raises(grpc.RpcError) as err:
                    remote_snapshots.listed(stub, str(path), writable=True)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "is not a directory on this worker" in err.value.details(), err.value.details()
            if os.geteuid() != 0:  # root writes anywhere
                locked = tmp_path / "locked"
                locked.mkdir(mode=0o555)
                with pytest.raises(grpc.RpcError, match="is not writable on this worker"):
                    remote_snapshots.listed(stub, str(locked), writable=True)
            assert not (tmp_path / "no").exists()  # nothing is made

