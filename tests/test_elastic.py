"""The elastic pool under load, with real processes: scale, kill -9, SIGSTOP, controller restarts.

Every scenario runs a closed-loop load against the frontend that checks each
answer against transformers' own forward; the pass condition is zero failed
requests and zero wrong answers.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from moecluster.backends.local import ClusterError
from moecluster.backends.processes import ProcessRecord, alive
from moecluster.models.checkpoint import Checkpoint
from moecluster.observability.prometheus import parse
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.sdk.client import Client, MoEClusterError
from moecluster.sdk.load import ClosedLoopLoad
from shared import wait_for
from transformers import AutoModelForCausalLM


@pytest.fixture
def reference(checkpoints):
    path = checkpoints["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return path, batch, model(batch).logits


@pytest.fixture
def cluster(local_clusters, reference):
    return lambda name, workers, replicas=2, **kwargs: local_clusters(name, reference[0], workers, replicas, **kwargs)


def serving(status):
    return [w for w in status["workers"] if w["state"] == "serving"]


def assert_spec(status, workers, replicas):
    live = serving(status)
    assert len(live) == workers, status
    copies = {}
    for w in live:
        for layer, expert in w["experts"]:
            copies[(layer, expert)] = copies.get((layer, expert), 0) + 1
    assert len(copies) == 16 and min(copies.values()) >= replicas, copies


def assert_bit_identical(status, path):
    """Every copy a worker exports equals the checkpoint's bytes; every expert is checked on some worker.

    A copy the controller drops between `status` and the export (a rebalance still going on) is skipped.
    """
    from moecluster.wire import streaming
    from moecluster.wire.tensors import decode

    index = Checkpoint(path)
    checked = set()
    for w in serving(status):
        with grpc.insecure_channel(w["address"]) as channel:
            stub = worker_pb2_grpc.ExpertWorkerStub(channel)
            for layer, expert in w["experts"]:
                try:
                    chunks = stub.ExportExpert(worker_pb2.ExportExpertRequest(
                        expert=worker_pb2.ExpertKey(layer=layer, expert=expert)), timeout=30)
                    state = worker_pb2.ExpertState.FromString(streaming.join(chunks, limit_bytes=1 << 30))
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        continue
                    raise
                gate_up, down = index.read_expert(layer, expert)
                assert torch.equal(decode(state.gate_up_proj), gate_up), (w["id"], layer, expert)
                assert torch.equal(decode(state.down_proj), down), (w["id"], layer, expert)
                checked.add((layer, expert))
    assert len(checked) == 16, f"only {len(checked)} experts could be checked"


def load_for(c, reference, **kwargs):
    _, batch, expected = reference
    return ClosedLoopLoad(c.status()["endpoint"], batch, expected, clients=2, max_seconds=300, **kwargs)


def check(report):
    assert report.ok > 0
    assert report.failed == 0, report.errors[:3]
    assert report.wrong == 0, report.worst_error


def test_scale_up_and_down_under_load_fails_nothing(cluster, reference):
    c = cluster("scale", workers=3)
    with load_for(c, reference) as load:
        time.sleep(1)
        lines = []
        epoch = Client(c.status()["endpoint"]).scale(5, progress=lines.append)  # the SDK's way
        assert epoch == c.status()["epoch"] and any("5/5" in line for line in lines)
        assert_spec(c.status(), 5, 2)
        # A layer waits for its busiest worker: every worker holds experts of every layer (test_plan.py shows
        # the scale without load, where balancing only totals gave the new workers one layer's experts).
        assert all({layer for layer, _ in w["experts"]} == {0, 1} for w in serving(c.status())), c.status()
        time.sleep(1)
        list(c.scale(2))
        assert_spec(c.status(), 2, 2)
        time.sleep(1)
    check(load.report)
    assert_bit_identical(c.status(), reference[0])


def test_a_pool_restore_under_load_fails_nothing(local_clusters, reference, tmp_path):
    """Every expert on every worker replaced from a snapshot, three times, while requests flow: none fails.
    The snapshot is of the untrained pool, so every answer must stay the checkpoint's."""
    c = local_clusters("restore-load", reference[0], 2, 1, snapshot_dir=tmp_path / "snaps")
    assert any("snapshot of step 0: 16 experts" in line for line in c.snapshot())
    with load_for(c, reference) as load:
        time.sleep(1)
        for _ in range(3):
            lines = list(c.restore())
            assert any("every expert back at step 0" in line for line in lines), lines
            time.sleep(0.3)
    check(load.report)
    assert_bit_identical(c.status(), reference[0])


def test_kill_minus_nine_loop_under_load(cluster, reference):
    c = cluster("kills", workers=3)
    rng = random.Random(0)
    kills = 0
    deadline = time.monotonic() + 60
    with load_for(c, reference) as load:
        while time.monotonic() < deadline and kills < 4:
            victim = rng.choice(serving(c.status()))
            os.kill(victim["pid"], signal.SIGKILL)
            kills += 1
            time.sleep(1.5)
            status = c.wait_converged(90, lambda _: None)
            assert_spec(status, 3, 2)
            assert victim["id"] not in [w["id"] for w in status["workers"]]
    check(load.report)
    assert kills >= 2
    assert_bit_identical(c.status(), reference[0])


def test_hung_worker_is_detected_removed_and_fenced(cluster, reference):
    c = cluster("hung", workers=3)
    victim = serving(c.status())[1]
    record = ProcessRecord.load(c.dir / "workers" / f"{victim['id']}.json")
    with load_for(c, reference) as load:
        time.sleep(0.5)
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            while time.monotonic() - stopped_at < 10:
                ids = [w["id"] for w in serving(c.status())]
                if victim["id"] not in ids:
                    break
                time.sleep(0.1)
            detected = time.monotonic() - stopped_at
            assert victim["id"] not in [w["id"] for w in serving(c.status())]
            time.sleep(max(0.0, 10 - (time.monotonic() - stopped_at)))
        finally:
            if alive(record):
                os.kill(victim["pid"], signal.SIGCONT)
        status = c.wait_converged(90, lambda _: None)
    check(load.report)
    assert detected <= 3.0, f"hung worker detected after {detected:.1f}s"
    assert_spec(status, 3, 2)
    deadline = time.monotonic() + 15
    while alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(record), "a worker declared dead is fenced: it never serves again"


def test_controller_killed_during_a_scale_is_restarted_by_its_supervisor_and_the_scale_call_goes_on(cluster, reference):
    c = cluster("restart", workers=3)
    errors, lines = [], []

    def scale():  # the SDK's way (`moectl restore` rides through a restart the same way: test_training.py)
        try:
            Client(c.status()["endpoint"]).scale(5, progress=lines.append)
        except MoEClusterError as err:
            errors.append(err)

    with load_for(c, reference) as load:
        thread = threading.Thread(target=scale)
        thread.start()
        deadline = time.monotonic() + 60
        while len(c.status()["workers"]) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        controller = c.controller_record()
        os.kill(controller.pid, signal.SIGKILL)  # in the middle of the scale: workers started, experts moving
        thread.join(timeout=120)
        status = c.wait_converged(120, lambda _: None)  # nobody restarts it but its supervisor
        assert c.controller_record().pid != controller.pid
    check(load.report)
    assert not errors and not thread.is_alive(), errors  # Scale sets a target: it was asked again, and returned
    assert any("the controller stopped answering" in line for line in lines), lines
    assert any(line.startswith("done: 5 workers serving") for line in lines), lines
    assert status["desired_workers"] == 5
    assert_spec(status, 5, 2)
    table = {}
    for w in serving(status):
        for key in map(tuple, w["experts"]):
            table.setdefault(key, []).append(w["id"])
    assert all(len(set(h)) == len(h) for h in table.values())
    assert_bit_identical(status, reference[0])


def test_a_drain_cut_off_by_a_controller_crash_goes_on_with_its_worker_and_drains_once(cluster, reference):
    """The drained worker is named in the spec: the restarted controller drains it (left to itself it would
    empty the newest worker), the cut-off call is asked again and returns, and asking once more drains nothing."""
    c = cluster("drainkill", workers=4)
    before = {w["id"] for w in serving(c.status())}
    oldest = min(before, key=lambda w: int(w.rsplit("-", 1)[1]))
    errors, lines = [], []

    def drain():
        try:
            lines.extend(c.drain(oldest))
        except ClusterError as err:
            errors.append(err)

    with load_for(c, reference) as load:
        controller, frontend, epoch = c.controller_record(), c.frontend_record(), c.status()["epoch"]
        thread = threading.Thread(target=drain)
        os.kill(frontend.pid, signal.SIGSTOP)  # holds the drain after its switch: the new table waits for an ack
        try:
            thread.start()
            assert wait_for(lambda: c.status()["epoch"] > epoch, timeout=30), "the drain never published"
            states = {w["id"]: w["state"] for w in c.status()["workers"]}
            os.kill(controller.pid, signal.SIGKILL)  # switched away from the worker; not yet dropped, drained, stopped
        finally:
            os.kill(frontend.pid, signal.SIGCONT)
        thread.join(timeout=120)
        status = c.wait_converged(120, lambda _: None)
        assert c.controller_record().pid != controller.pid
        again = list(c.drain(oldest))  # by hand, after it finished: nothing more is drained
    check(load.report)
    assert not errors and not thread.is_alive(), errors
    assert any("the controller stopped answering" in line for line in lines), lines
    assert states == {w: "leaving" if w == oldest else "serving" for w in before}, states
    assert {w["id"] for w in serving(status)} == before - {oldest}, status
    assert status["desired_workers"] == 3 and again == [f"{oldest} has left the pool"], again
    assert_spec(c.status(), 3, 2)
    with pytest.raises(ClusterError, match="not serving"):
        list(c.drain("worker-99"))


def test_a_replace_starts_its_successor_first_and_the_pool_never_shrinks(cluster, reference):
    """A replace (here through the SDK): a new worker starts and takes the old one's experts (one copy each:
    all of them move) before the old one goes; polled all along, the pool never has fewer than 3 serving."""
    c = cluster("replace", workers=3, replicas=1)
    before = {w["id"] for w in serving(c.status())}
    oldest = min(before, key=lambda w: int(w.rsplit("-", 1)[1]))
    polls, done = [], threading.Event()

    def poll():
        while not done.is_set():
            polls.append({w["id"]: w["state"] for w in c.status()["workers"]})
            time.sleep(0.05)

    with load_for(c, reference) as load:
        poller = threading.Thread(target=poll)
        poller.start()
        lines = []
        try:
            epoch = Client(c.status()["endpoint"]).drain(oldest, replace=True, progress=lines.append)
        finally:
            done.set()
            poller.join(timeout=30)
        again = list(c.drain(oldest, replace=True))
        with pytest.raises(MoEClusterError, match="not serving"):
            Client(c.status()["endpoint"]).drain("worker-99")
    check(load.report)
    status = c.status()
    (new,) = {w["id"] for w in serving(status)} - before
    assert lines[0].startswith(f"replacing {oldest}") and lines[-1].startswith("done: 3 workers serving"), lines
    assert epoch == status["epoch"]
    assert any(line.startswith("2/3 workers serving") for line in lines), lines  # waiting for the successor: it says so
    assert {w["id"] for w in serving(status)} == before - {oldest} | {new} and status["desired_workers"] == 3
    assert again == [f"{oldest} has left the pool"], again
    assert all(sum(s in ("serving", "leaving") for s in p.values()) >= 3 for p in polls), polls
    assert any(p.get(oldest) == "leaving" and new in p for p in polls), polls  # the successor started first
    left = next(p for p in polls if p.get(oldest) not in ("serving", "leaving"))
    assert left.get(new) == "serving", left  # and served before the old one stopped
    assert_spec(status, 3, 1)


def test_migrate_drain_and_metrics(cluster, reference):
    # No moves for load: a hot expert copied back beside the migrated one would race the holders' check.
    c = cluster("ops", workers=3, replicas=1, rebalance_above=100)
    status = c.status()
    source = serving(status)[0]
    layer, expert = source["experts"][0]
    target = serving(status)[1]["id"]
    with load_for(c, reference) as load:
        lines = list(c.migrate(layer, expert, target))
        assert any(target in line for line in lines)
        moved = c.status()
        holders = [w["id"] for w in serving(moved) if [layer, expert] in w["experts"]]
        assert holders == [target]
        # Asked again (a cut-off call) it is no error: nothing to move, or only what a rebalance changed meanwhile.
        again = list(c.migrate(layer, expert, target))
        assert again[-1].startswith(f"expert {(layer, expert)} now on [") and repr(target) in again[-1], again
        list(c.drain(serving(moved)[2]["id"]))
        assert_spec(c.status(), 2, 1)
    check(load.report)
    info = (c.dir / "run" / "controller.ready").read_text()
    metrics_address = __import__("json").loads(info)["metrics"]
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    assert "moecluster_epoch" in text and 'moecluster_bytes_moved_total{source="peer"}' in text
    assert 'moecluster_layer_imbalance{layer="0"}' in text, text  # the load ran through both layers
    timed = {(labels["method"], labels["code"]): v for name, labels, v in parse(text)
             if name == "moecluster_controller_rpc_seconds_count"}
    assert timed[("Migrate", "OK")] == 2 and timed[("Drain", "OK")] == 1 and timed[("Status", "OK")] >= 2, timed
    with pytest.raises(ClusterError, match="not serving"):
        list(c.migrate(layer, expert, "worker-99"))


def test_zipf_skewed_load_gets_hot_experts_replicated(cluster, reference):
    """Load drawn Zipf(1.2) over layer 0's experts: the controller copies the hot ones and imbalance falls."""
    from moecluster.controller.placement import imbalance
    from moecluster.frontend.dispatcher import Dispatcher, ExpertUnavailableError
    from moecluster.frontend.routing import RoutingTable
    from moecluster.frontend.table_watcher import TableWatcher

    c = cluster("zipf", workers=4, replicas=1)
    controller = c.info()["controller"]
    dispatcher = Dispatcher(RoutingTable(0, {}), timeout=30)
    watcher = TableWatcher(controller, dispatcher, "zipf-load")
    watcher.start()
    assert watcher.first_table.wait(30)
    gen = torch.Generator().manual_seed(0)
    ranks = torch.randperm(8, generator=gen)  # which expert is hottest is arbitrary
    zipf = torch.tensor([1 / (r + 1) ** 1.2 for r in range(8)])
    probabilities = torch.empty(8)
    probabilities[ranks] = zipf / zipf.sum()
    hottest = int(ranks[0])
    before = {}
    for w in serving(c.status()):
        for layer, expert in w["experts"]:
            before.setdefault((layer, expert), []).append(w["id"])
    skew = imbalance(before, {key: float(probabilities[key[1]]) if key[0] == 0 else 0.0 for key in before},
                     [w["id"] for w in serving(c.status())])
    imbalances = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ids = torch.multinomial(probabilities, 256, replacement=True, generator=gen).view(256, 1)
            try:  # this load only drives the controller; the zero-failure promise is tested through frontends
                dispatcher.forward(0, torch.randn(256, 64, generator=gen), ids, torch.ones(256, 1))
            except ExpertUnavailableError:
                pass
            status = c.status()
            imbalances.append(status["imbalance"])
            layers = status["layer_imbalance"]
            copies = sum(1 for w in serving(status) if [0, hottest] in w["experts"])
            if copies >= 2 and status["imbalance"] <= 1.3:
                break
    finally:
        watcher.stop()
        dispatcher.close()
    assert copies >= 2, f"the hottest expert has {copies} copies"
    # the controller may copy the hot expert before a status poll sees the imbalance: judge the load itself
    assert skew > 1.3, f"this load on the first layout is skewed (imbalance {skew:.2f}), or the test proves nothing"
    assert imbalances[-1] <= 1.3, imbalances[-10:]
    assert list(layers) == [0] and layers[0] == pytest.approx(imbalances[-1], abs=1e-3), layers  # the one loaded
    assert_bit_identical(c.status(), reference[0])


def test_experts_that_lost_every_copy_are_reloaded_from_the_checkpoint(cluster, reference):
    c = cluster("orphans", workers=2, replicas=1)
    victim = serving(c.status())[0]
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(0.5)
    status = c.wait_converged(90, lambda _: None)
    assert_spec(status, 2, 1)
    with Client(status["endpoint"]) as client:
        assert (client.forward(reference[1]) - reference[2]).abs().max() <= 1e-4
    assert_bit_identical(status, reference[0])


def test_nothing_is_orphaned_when_the_controller_dies_while_a_worker_starts(cluster, reference):
    c = cluster("orphan-start", workers=1, replicas=1)
    errors = []
    thread = threading.Thread(target=lambda: errors.extend(_scale_errors(c, 2)))
    thread.start()
    folder = c.dir / "workers"
    deadline = time.monotonic() + 60
    while len(list(folder.glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    starting = ProcessRecord.load(sorted(folder.glob("*.json"))[-1])
    os.kill(c.controller_record().pid, signal.SIGKILL)  # the new worker's process exists; it may not serve yet
    thread.join(timeout=60)
    status = c.wait_converged(120, lambda _: None)
    assert len(serving(status)) == 2
    c.down(grace=2)
    deadline = time.monotonic() + 15
    while alive(starting) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(starting), "the worker that was starting when the controller died is not left running"


def test_a_new_controller_whose_port_was_taken_moves_to_another(cluster, reference, monkeypatch):
    """`up` picks the controller's port before the controller binds it; another process may bind it first."""
    from moecluster.backends import local

    real = local.free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1]])  # the controller's (the frontend takes any free port itself)
        monkeypatch.setattr(local, "free_port", lambda: next(picks, None) or real())
        c = cluster("taken", workers=1, replicas=1)
        moved = c.status()["controller"]
        assert moved != f"127.0.0.1:{taken.getsockname()[1]}"
    killed = c.controller_record().pid
    os.kill(killed, signal.SIGKILL)
    assert wait_for(lambda: c.controller_record().pid != killed and c.controller_running(), 60)
    status = c.wait_converged(60, lambda _: None)  # a restarted controller keeps the address frontends know
    assert status["controller"] == moved and len(serving(status)) == 1
    with Client(status["endpoint"]) as client:
        assert (client.forward(reference[1]) - reference[2]).abs().max() <= 1e-4


def test_a_killed_frontend_is_started_again_on_its_port_and_clients_fail_nothing(cluster, reference):
    """The controller restarts a local frontend that died; clients retry their reads until it is back."""
    c = cluster("frontend", workers=1, replicas=1)
    endpoint = c.status()["endpoint"]
    assert c.info()["frontend_port"] == int(endpoint.rsplit(":", 1)[1])  # `up --port 0`: recorded once taken
    with load_for(c, reference) as load:
        time.sleep(1)
        killed = c.frontend_record()
        os.kill(killed.pid, signal.SIGKILL)
        record = c.wait_new_frontend(killed.pid, timeout=60)
        assert record is not None and record.address == endpoint, record
        answered, deadline = load.report.ok, time.monotonic() + 30
        while load.report.ok <= answered + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert load.report.ok > answered + 10, "the load goes on through the new frontend"
    check(load.report)


def test_a_killed_supervisor_is_started_again_by_its_controller_and_resume_restarts_what_nothing_would(cluster,
                                                                                                      reference):
    c = cluster("resume", workers=1, replicas=1)
    first, controller = c.supervisor_record(), c.controller_record()
    os.kill(first.pid, signal.SIGKILL)
    assert wait_for(lambda: (s := c.supervisor_record()) is not None and s.pid != first.pid and alive(s), 30), \
        "the controller starts a supervisor again"
    assert c.controller_record().pid == controller.pid, "adopted, not a second controller"
    assert c.status()["supervised"]
    os.kill(controller.pid, signal.SIGKILL)  # not the new supervisor's child: it restarts it all the same
    assert wait_for(lambda: c.controller_record().pid != controller.pid and c.controller_running(), 60)
    c.wait_converged(60, lambda _: None)

    # Stopped on purpose (SIGTERM), a supervisor is not started again: the controller runs on without one.
    os.kill(c.supervisor_record().pid, signal.SIGTERM)
    assert wait_for(lambda: not c.status()["supervised"], 10), "status says a dead controller would stay down"
    time.sleep(2)
    assert c.supervisor_record() is None and not c.status()["supervised"]
    controller = c.controller_record()
    c.start_controller()  # moectl resume, with the controller running: adopted
    assert c.controller_record().pid == controller.pid and c.status()["supervised"]

    # Both gone: nothing restarts them but `moectl resume`.
    os.kill(c.supervisor_record().pid, signal.SIGTERM)
    assert wait_for(lambda: c.supervisor_record() is None, 10)
    os.kill(controller.pid, signal.SIGKILL)
    time.sleep(1)
    with pytest.raises(ClusterError, match="moectl resume"):
        c.status(rpc_timeout=2)
    c.start_controller()  # moectl resume
    status = c.wait_converged(60, lambda _: None)
    assert len(serving(status)) == 1 and c.status()["supervised"]
    with Client(status["endpoint"]) as client:
        assert (client.forward(reference[1]) - reference[2]).abs().max() <= 1e-4


def _scale_errors(c, workers):
    try:
        list(c.scale(workers))
        return []
    except ClusterError as err:
        return [err]
