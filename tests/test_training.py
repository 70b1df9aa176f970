"""Training through a real local cluster equals plain PyTorch training of the same checkpoint:
undisturbed, with a worker killed mid-step and the pool scaled mid-training, with duplicated and
reordered update messages, resumed from a save after the trainer stopped mid-update, and with
every copy of some experts lost (restored from a snapshot)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from moecluster.backends.local import ClusterError
from moecluster.cli.train import batch_for, train
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.sdk.training import ExpertOptimizer, TrainingError, TrainingSession
from moecluster.workers import snapshot_folders
from shared import assert_trained_like, plain_pytorch_training
from transformers import AutoModelForCausalLM

STEPS, BATCH, SEQ, LR, SEED = 30, 2, 8, 1e-3, 0


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints["qwen3_moe"]


@pytest.fixture(scope="module")
def reference(path):
    """Plain PyTorch: losses of every step, weights after 10 and after 30 steps."""
    return plain_pytorch_training(path, STEPS, BATCH, SEQ, LR, SEED, keep=(10, STEPS))


@pytest.fixture
def cluster(local_clusters, path):
    return lambda name, workers, replicas, **kwargs: local_clusters(name, path, workers, replicas, **kwargs)


def assert_matches(rows, reference, steps, final_dir):
    losses, states = reference
    assert len(rows) == steps
    assert_trained_like(rows, losses, final_dir, states[steps])


def eventually(check, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def serving(status):
    return [w for w in status["workers"] if w["state"] == "serving"]


def test_thirty_steps_through_three_workers_equal_pytorch(cluster, reference, tmp_path):
    c = cluster("train", workers=3, replicas=1, snapshot_dir=tmp_path / "snaps", snapshot_every_s=0.5)
    rows = train(c.status()["controller"], c.info()["model"], steps=STEPS, batch=BATCH, seq=SEQ,
                 lr=LR, seed=SEED, out=tmp_path / "run", progress=lambda line: None)
    assert_matches(rows, reference, STEPS, tmp_path / "run" / "final")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(STEPS))
    assert eventually(lambda: c.status()["step"] == STEPS)  # the controller learns versions from heartbeats
    taken = snapshot_folders.newest_first(tmp_path / "snaps")  # periodic snapshots, taken while training
    assert taken and 1 <= taken[0].step <= STEPS and len(taken[0].files) == 16


def test_kill_minus_nine_mid_step_and_scale_mid_training_change_nothing(cluster, reference, tmp_path):
    c = cluster("chaos", workers=3, replicas=2)
    killed, scaled = [], []

    def mid_step(s):
        if s == 10:  # forward done, backward not yet: the step is redone or completed on the survivors
            victim = serving(c.status())[0]
            os.kill(victim["pid"], signal.SIGKILL)
            killed.append(victim["id"])

    def before_step(s):
        if s == 20:
            thread = threading.Thread(target=lambda: scaled.extend(c.scale(4)), daemon=True)
            thread.start()
            scaled.append(thread)

    rows = train(c.status()["controller"], c.info()["model"], steps=STEPS, batch=BATCH, seq=SEQ, lr=LR, seed=SEED,
                 out=tmp_path / "run", progress=lambda line: None, before_step=before_step, mid_step=mid_step)
    scaled[0].join(timeout=120)
    status = c.status()
    assert killed and killed[0] not in {w["id"] for w in serving(status)}
    assert len(serving(status)) == 4 and eventually(lambda: c.status()["step"] == STEPS)
    assert_matches(rows, reference, STEPS, tmp_path / "run" / "final")


class Chaos(grpc.UnaryUnaryClientInterceptor):
    """Sends every Backward and ApplyUpdate twice, and after each update the previous step's again (late)."""

    def __init__(self):
        self.duplicates = 0
        self.previous: dict[str, object] = {}

    def intercept_unary_unary(self, continuation, details, request):
        method = details.method.rsplit("/", 1)[-1]
        if method not in ("Backward", "ApplyUpdate"):
            return continuation(details, request)
        continuation(details, request).result()
        answer = continuation(details, request)
        if method == "ApplyUpdate":
            self.duplicates += sum(a.duplicate for a in answer.result().acks)
            late = self.previous.get(details.method + str(sorted(e.expert.expert for e in request.experts)))
            if late is not None:
                self.duplicates += sum(a.duplicate for a in continuation(details, late).result().acks)
            self.previous[details.method + str(sorted(e.expert.expert for e in request.experts))] = request
        return answer


def test_duplicated_and_reordered_messages_change_nothing(cluster, reference, tmp_path, monkeypatch):
    c = cluster("dups", workers=2, replicas=1)
    chaos = Chaos()
    plain = grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel",
                        lambda address, *a, **k: grpc.intercept_channel(plain(address, *a, **k), chaos))
    rows = train(c.status()["controller"], c.info()["model"], steps=10, batch=BATCH, seq=SEQ, lr=LR, seed=SEED,
                 out=tmp_path / "run", progress=lambda line: None)
    monkeypatch.undo()
    assert chaos.duplicates >= 10 * 16  # every expert answered a repeat each step with its stored acknowledgement
    assert_matches(rows, reference, 10, tmp_path / "run" / "final")


class LoseOneBackward(grpc.UnaryUnaryClientInterceptor):
    """On the channels to one worker, fails its `nth` Backward call as a network blip would (never sent);
    with `refuse_resync`, also every PullExpert the trainer sends it (so the trainer cannot re-sync it)."""

    def __init__(self, nth: int, refuse_resync: bool = False):
        self.nth, self.calls, self.lost = nth, 0, 0
        self.refuse_resync, self.resyncs_refused = refuse_resync, 0

    def intercept_unary_unary(self, continuation, details, request):
        if details.method.endswith("/Backward"):
            self.calls += 1
            if self.calls == self.nth:
                self.lost += 1
                raise _Unavailable()
        if self.refuse_resync and details.method.endswith("/PullExpert"):
            self.resyncs_refused += 1
            raise _Unavailable()
        return continuation(details, request)


class _Unavailable(grpc.RpcError, grpc.Future):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "injected: connection reset"

    def result(self, timeout=None):
        raise self

    def exception(self, timeout=None):
        return self

    def cancel(self):
        return False

    def cancelled(self):
        return False

    def running(self):
        return False

    def done(self):
        return True

    def traceback(self, timeout=None):
        return None

    def add_done_callback(self, fn):
        fn(self)


def test_a_replica_that_missed_a_gradient_copies_the_update_and_never_serves_stale_weights(cluster, reference, tmp_path,
                                                                                         monkeypatch):
    c = cluster("resync", workers=2, replicas=2)  # every expert on both workers
    victim = serving(c.status())[1]["address"]
    blip = LoseOneBackward(nth=5)  # step 3's first layer: that worker's gradient of it never arrives
    plain = grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel", lambda address, *a, **k: grpc.intercept_channel(
        plain(address, *a, **k), blip) if address == victim else plain(address, *a, **k))
    rows = train(c.status()["controller"], c.info()["model"], steps=10, batch=BATCH, seq=SEQ, lr=LR, seed=SEED,
                 out=tmp_path / "run", progress=lambda line: None)
    monkeypatch.undo()
    assert blip.lost == 1
    assert_matches(rows, reference, 10, tmp_path / "run" / "final")
    with TrainingSession(c.status()["controller"]) as session:  # without the copy that worker stays at version 2
        assert set(session.versions().values()) == {10}


def test_a_replica_the_trainer_cannot_resync_answers_no_trainer_and_the_controller_catches_it_up(cluster, reference,
                                                                                               tmp_path, monkeypatch):
    c = cluster("catchup", workers=2, replicas=2)  # every expert on both workers
    victim = serving(c.status())[1]
    blip = LoseOneBackward(nth=5, refuse_resync=True)  # step 3 misses a gradient there; the trainer's copy fails
    plain = grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel", lambda address, *a, **k: grpc.intercept_channel(
        plain(address, *a, **k), blip) if address == victim["address"] else plain(address, *a, **k))
    rows = train(c.status()["controller"], c.info()["model"], steps=10, batch=BATCH, seq=SEQ, lr=LR, seed=SEED,
                 out=tmp_path / "run", progress=lambda line: None)
    monkeypatch.undo()
    assert blip.lost == 1 and blip.resyncs_refused >= 1
    assert_matches(rows, reference, 10, tmp_path / "run" / "final")  # no forward read the stale replica

    channel = grpc.insecure_channel(victim["address"])
    stub = worker_pb2_grpc.ExpertWorkerStub(channel)
    versions = lambda: set(stub.Stats(worker_pb2.StatsRequest(), timeout=10).versions)  # noqa: E731
    assert eventually(lambda: versions() == {10}), f"the controller did not catch it up: versions {versions()}"
    channel.close()
    with TrainingSession(c.status()["controller"]) as session:
        assert set(session.versions().values()) == {10}
    metrics = json.loads((c.dir / "run" / "controller.ready").read_text())["metrics"]
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    assert any(line.startswith("moecluster_replicas_resynced_total ") and float(line.split()[-1]) >= 1
               for line in text.splitlines()), text


class CutUpdates(grpc.UnaryUnaryClientInterceptor):
    """On the channels to one worker: its `nth` ApplyUpdate and every later one never arrive, as when the
    trainer stops after sending the step's update to some workers and before the others."""

    def __init__(self, nth: int):
        self.nth, self.calls = nth, 0

    def intercept_unary_unary(self, continuation, details, request):
        if details.method.endswith("/ApplyUpdate"):
            self.calls += 1
            if self.calls >= self.nth:
                return _Unavailable()
        return continuation(details, request)


def test_a_trainer_stopped_mid_update_resumes_from_its_last_save_as_if_it_never_stopped(cluster, reference, tmp_path,
                                                                                      monkeypatch):
    c = cluster("resume", workers=2, replicas=1, snapshot_dir=tmp_path / "snaps")
    controller, model = c.status()["controller"], c.info()["model"]
    victim = serving(c.status())[1]["address"]
    cut = CutUpdates(nth=5)  # step 5 reaches the other worker only
    plain = grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel", lambda address, *a, **k: grpc.intercept_channel(
        plain(address, *a, **k), cut) if address == victim else plain(address, *a, **k))
    with pytest.raises(TrainingError, match="step 5: no holder"):
        train(controller, model, steps=10, batch=BATCH, seq=SEQ, lr=LR, seed=SEED, out=tmp_path / "run",
              progress=lambda line: None, save_every=3)
    monkeypatch.undo()
    cut_off = lambda: (lambda s: (s["lowest_step"], s["step"], s["trainers"]))(c.status())  # noqa: E731
    assert eventually(lambda: cut_off() == (4, 5, [])), cut_off()  # half the pool at step 5, no trainer: reported
    saved = snapshot_folders.newest_first(tmp_path / "snaps")
    assert [s.step for s in saved] == [3] and (saved[0].path / "trainer.pt").is_file()
    with pytest.raises(TrainingError, match="different versions .*moectl restore"):  # half the pool is at step 5
        TrainingSession(controller)

    rows = train(controller, model, steps=7, batch=BATCH, seq=SEQ, lr=LR, seed=SEED, out=tmp_path / "run",
                 progress=lambda line: None, resume=tmp_path / "snaps")
    assert [r["step"] for r in rows] == list(range(3, 10)) and rows[0]["version"] == 4
    losses, states = reference
    for row in rows:  # the dense weights, both optimizers' moments and the batches all continue from step 3
        assert abs(row["loss"] - losses[row["step"]]) <= 1e-4 * abs(losses[row["step"]]), row
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32).state_dict()
    assert max((trained[k] - states[10][k]).abs().max().item() for k in states[10]) <= 1e-4
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(10))  # the undone step 4 is not kept
    assert "step 3 from" in c.status()["restored"]

    with TrainingSession(controller) as session:  # a pool restore is refused while a trainer is connected
        with pytest.raises(ClusterError, match="trainers .* are connected"):
            list(c.restore(saved[0].path))
    restored = list(c.restore(saved[0].path))
    assert any("every expert back at step 3 (7 updates undone)" in line for line in restored), restored
    assert not any("waiting" in line for line in restored), "the closed session said it left: no lease to wait out"
    with TrainingSession(controller) as session:
        assert set(session.versions().values()) == {3}


def stepper(session, path):
    """One training step at a time through `session` (the SDK's way): step(s) -> its loss."""
    model = session.model(path)
    opt = ExpertOptimizer(model, session, lr=LR, weight_decay=0.0)

    def step(s):
        x = batch_for(s, SEED, 128, BATCH, SEQ)

        def closure():
            opt.zero_grad()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss
        return opt.step(closure).item()
    step.model, step.optimizer = model, opt  # what `session.save` takes
    return step


def test_every_copy_lost_is_restored_from_the_last_good_snapshot_and_reported(cluster, tmp_path, path):
    c = cluster("restore", workers=3, replicas=1, snapshot_dir=tmp_path / "snaps")
    with TrainingSession(c.status()["controller"]) as session:
        step = stepper(session, path)

        for s in range(2):
            step(s)
        assert any("snapshot of step 2" in line for line in c.snapshot())
        for s in range(2, 4):
            step(s)
        list(c.snapshot())
        step(4)  # the pool is at step 5; snapshots at 2 and 4
        workers = serving(c.status())
        victim = workers[0]
        elsewhere = {tuple(k) for w in workers[1:] for k in w["experts"]}  # hot experts may have extra copies
        lost = [tuple(k) for k in victim["experts"] if tuple(k) not in elsewhere]
        assert lost
        newest = snapshot_folders.newest_first(tmp_path / "snaps")[0]
        assert newest.step == 4
        torn = newest.path / newest.files[lost[0]].file
        data = bytearray(torn.read_bytes())
        data[len(data) // 2] ^= 0xFF
        torn.write_bytes(bytes(data))  # the step-4 snapshot of one lost expert is torn: refused, step 2 used
        os.kill(victim["pid"], signal.SIGKILL)
        losses = [step(s) for s in range(5, 8)]  # training continues through the restore
        assert all(torch.isfinite(torch.tensor(losses)))
        assert set(session.versions().values()) == {8}
    status = c.status()
    rolled = {(r["layer"], r["expert"]): r for r in status["rollbacks"]}
    assert set(rolled) == set(lost) and {r["step"] for r in rolled.values()} == {5}
    # the torn file's expert came back from the snapshot before; the others from the newest, or that one
    assert rolled[lost[0]]["snapshot_step"] == 2 and "step-00000002" in rolled[lost[0]]["source"]
    assert {r["snapshot_step"] for r in rolled.values()} <= {2, 4}


def test_a_restore_cut_off_by_a_controller_crash_is_asked_again_and_finished(cluster, tmp_path, path):
    """The controller dies after one worker's experts are back at the snapshot's step and before the other's:
    `restore` waits for its supervisor to start it again and asks again, so the pool ends whole at that step."""
    c = cluster("restore-crash", workers=2, replicas=1, snapshot_dir=tmp_path / "snaps", rebalance_above=100)
    assert any("snapshot of step 0" in line for line in c.snapshot())
    with TrainingSession(c.status()["controller"]) as session:
        step = stepper(session, path)
        for s in range(2):
            step(s)
        assert set(session.versions().values()) == {2}
    first, last = sorted(serving(c.status()), key=lambda w: w["id"])  # restored in this order
    controller = c.controller_record()
    lines = []
    os.kill(last["pid"], signal.SIGSTOP)  # holds the restore between the two workers
    try:
        for line in c.restore():
            lines.append(line)
            if line.startswith(f"{first['id']}: ") and not any("stopped answering" in seen for seen in lines):
                os.kill(controller.pid, signal.SIGKILL)
                os.kill(last["pid"], signal.SIGCONT)
    finally:
        os.kill(last["pid"], signal.SIGCONT)
    assert c.controller_record().pid != controller.pid
    assert any("the controller stopped answering" in line for line in lines), lines
    assert any("every expert back at step 0" in line for line in lines), lines
    status = c.status()
    assert (status["lowest_step"], status["step"]) == (0, 0), status
    with TrainingSession(c.status()["controller"]) as session:
        assert set(session.versions().values()) == {0}
        assert len(session.versions()) == 16


def test_a_save_cut_off_by_a_controller_crash_is_asked_again_and_its_snapshot_resumes(cluster, tmp_path, path):
    """The controller dies after one worker wrote its experts and before the other did: `save` waits for its
    supervisor to start it again and asks again; the snapshot is whole, the trainer's state beside it."""
    # No re-placing for the steps' load: a copy into the worker stopped below would fail the save instead.
    c = cluster("save-crash", workers=2, replicas=1, snapshot_dir=tmp_path / "snaps", rebalance_above=100)
    assert c.spec().rebalance_above == 100
    first, last = sorted(serving(c.status()), key=lambda w: w["id"])  # written in this order
    controller = c.controller_record()
    lines = []

    def heard(line):
        lines.append(line)
        if line.startswith(f"{first['id']}: wrote") and not any("stopped answering" in seen for seen in lines):
            os.kill(controller.pid, signal.SIGKILL)
            os.kill(last["pid"], signal.SIGCONT)

    with TrainingSession(c.status()["controller"]) as session:
        step = stepper(session, path)
        for s in range(2):
            step(s)
        session.progress = heard
        os.kill(last["pid"], signal.SIGSTOP)  # holds the snapshot between the two workers
        try:
            folder = session.save(step.model, step.optimizer)
        finally:
            os.kill(last["pid"], signal.SIGCONT)
    assert c.controller_record().pid != controller.pid
    assert any("the controller stopped answering" in line for line in lines), lines
    assert folder.name == "step-00000002" and (folder / "trainer.pt").is_file(), list(folder.iterdir())
    assert [s.step for s in snapshot_folders.newest_first(tmp_path / "snaps")] == [2]
    with TrainingSession(c.status()["controller"], resume_from=folder) as session:
        assert session.resumed.step == 2 and session.step == 3
        assert set(session.versions().values()) == {2} and len(session.versions()) == 16


def test_reading_the_model_back_follows_an_expert_that_moved_after_the_table_was_read(cluster):
    """save_pretrained reads every expert from a holder while the pool keeps moving (a rebalance after
    training); a holder that dropped the expert since the table was read is asked again from a newer one."""
    c = cluster("moved", workers=2, replicas=1)
    with TrainingSession(c.status()["controller"], progress=lambda line: None) as session:
        old = session.dispatcher.table
        holder = old.holders(0, 3)[0]
        list(c.migrate(0, 3, next(w for w in old.workers if w != holder), source=holder))  # copy, switch, drop
        assert eventually(lambda: holder not in session.dispatcher.table.holders(0, 3))
        new = session.dispatcher.table
        session.dispatcher._table = old  # as read just before the move (update() refuses an older table)
        threading.Timer(0.5, lambda: session.dispatcher.update(new)).start()
        gate_up, down = session._export(0, 3)
    assert gate_up.shape[0] == 2 * down.shape[1] and torch.isfinite(gate_up).all()
