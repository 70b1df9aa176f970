"""moectl and the SDK end to end: real processes on 127.0.0.1, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from moecluster import Client
from moecluster.cli.moectl import build_parser
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.sdk.client import MoEClusterError
from transformers import AutoModelForCausalLM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "MOECLUSTER_HOME": str(tmp_path / "home"), "TRANSFORMERS_VERBOSITY": "error"}


def moectl(env, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "moecluster.cli.moectl", *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"moectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_the_issue_walkthrough(tmp_path, env):
    model = tmp_path / "tiny-qwen3"
    out = moectl(env, "model", "create", "--family", "qwen3_moe", "--out", str(model)).stdout
    assert "qwen3_moe" in out and (model / "config.json").is_file()
    port = free_port()
    up = moectl(env, "up", "--model", str(model), "--workers", "3", "--port", str(port), "--detach")
    assert f"127.0.0.1:{port}" in up.stdout and "workers 3/3 serving" in up.stderr
    try:
        shape = subprocess.run([sys.executable, "-c", "from moecluster import Client; import torch; "
                                f"print(Client('127.0.0.1:{port}').forward(torch.tensor([[1,2,3]])).shape)"],
                               env=env, capture_output=True, text=True, timeout=60)
        assert shape.stdout.strip() == "torch.Size([1, 3, 128])", shape.stderr
        status = json.loads(moectl(env, "status", "-o", "json").stdout)
        assert status["endpoint"] == f"127.0.0.1:{port}" and status["epoch"] == 1
        assert [w["state"] for w in status["workers"]] == ["serving"] * 3
        assert [w["device"] for w in status["workers"]] == ["cpu"] * 3  # moectl up's default --worker-device
        device = subprocess.run([sys.executable, "-c", "from moecluster import Client; "
                                 f"print(Client('127.0.0.1:{port}').status().frontend_device)"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert device.stdout.strip() == "cpu", device.stderr  # and --frontend-device's
        held = sorted(tuple(k) for w in status["workers"] for k in w["experts"])
        assert held == [(layer, e) for layer in (0, 1) for e in range(8)], "each expert on exactly one worker"
        text = moectl(env, "status").stdout
        assert "worker-2" in text and "serving" in text and "experts on cpu" in text
        replaced = moectl(env, "replace", "worker-0").stderr  # a new worker takes its experts; the pool keeps 3
        assert "replacing worker-0" in replaced and "done: 3 workers serving" in replaced, replaced
        status = json.loads(moectl(env, "status", "-o", "json").stdout)
        assert [(w["id"], w["state"]) for w in status["workers"]] == [(f"worker-{i}", "serving") for i in (1, 2, 3)]
        records = Path(env["MOECLUSTER_HOME"]) / "clusters" / "default"
        pids = [json.loads((records / f"{name}.json").read_text())["pid"]
                for name in ("supervisor", "controller", "frontend", "zygote")]
        pids += [w["pid"] for w in status["workers"]]
        assert all(alive(p) for p in pids)
    finally:
        down = moectl(env, "down")
    assert "stopped 7 processes" in down.stdout, "supervisor, controller, frontend, 3 workers and the worker zygote"
    assert wait_gone(pids) == [], "moectl down must leave no process behind"
    assert not (Path(env["MOECLUSTER_HOME"]) / "clusters" / "default").exists()


def test_answers_and_generation_match_transformers_and_survive_a_kill(tmp_path, env, checkpoints):
    model = checkpoints["mixtral"]
    port = free_port()
    moectl(env, "up", "--model", str(model), "--workers", "3", "--replicas", "2", "--port", str(port), "--detach",
           "--name", "kills")
    try:
        status = json.loads(moectl(env, "status", "--name", "kills", "-o", "json").stdout)
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        batch = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = reference(batch).logits
            expected_gen = reference.generate(batch[:1], attention_mask=torch.ones_like(batch[:1]), max_new_tokens=5,
                                              min_new_tokens=5, do_sample=False, pad_token_id=0)
        with Client(f"127.0.0.1:{port}") as client:
            assert (client.forward(batch) - expected).abs().max() <= 1e-4
            assert torch.equal(client.generate(batch[:1], max_new_tokens=5), expected_gen)
            victim = status["workers"][1]
            os.kill(victim["pid"], signal.SIGKILL)
            for _ in range(5):
                assert (client.forward(batch) - expected).abs().max() <= 1e-4
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            after = json.loads(moectl(env, "status", "--name", "kills", "-o", "json").stdout)
            if after["converged"] and victim["id"] not in [w["id"] for w in after["workers"]]:
                break
            time.sleep(0.5)
        assert [w["state"] for w in after["workers"]] == ["serving"] * 3, "the controller replaced the dead worker"
        assert victim["pid"] not in [w["pid"] for w in after["workers"]]
    finally:
        moectl(env, "down", "--name", "kills")


def test_named_clusters_side_by_side_each_with_its_serving_settings(env, checkpoints):
    """Two clusters at once; the first sets what its workers batch and its frontend's generation cache, the
    second keeps the defaults, and each process serves as its own cluster's `up` said."""
    ports = [free_port(), free_port()]
    settings = [["--worker-batch-tokens", "0", "--worker-compute-threads", "1", "--generate-cache-tokens", "64",
                 "--forward-batch-tokens", "0"], []]
    for name, port, family, extra in zip(["one", "two"], ports, ["olmoe", "qwen2_moe"], settings):
        moectl(env, "up", "--model", str(checkpoints[family]), "--workers", "1", "--port", str(port), "--detach",
               "--name", name, *extra)
    try:
        listing = moectl(env, "list").stdout
        assert "one" in listing and "two" in listing
        for port in ports:
            with Client(f"127.0.0.1:{port}") as client:
                assert client.forward(torch.tensor([[3, 4]])).shape == (1, 2, 128)
                assert client.generate(torch.tensor([[3, 4]]), max_new_tokens=3).shape == (1, 5)
        statuses = [Client(f"127.0.0.1:{p}").status() for p in ports]
        assert {s.family for s in statuses} == {"olmoe", "qwen2_moe"}
        assert [w.device for s in statuses for w in s.workers] == ["cpu", "cpu"]  # what the SDK reports
        assert [Client(f"127.0.0.1:{p}").info().generate_cache_tokens for p in ports] == [64, 4096]
        assert [Client(f"127.0.0.1:{p}").info().forward_batch_tokens for p in ports] == [0, 2048]
        stats = [worker_stats(s.workers[0].address) for s in statuses]
        assert all(s.requests >= 4 for s in stats), stats  # the forward's and the generation's, each layer
        assert [s.forward_batches > 0 for s in stats] == [False, True], "batching off on the first cluster only"
    finally:
        down = moectl(env, "down", "--all")
    assert down.stdout.count("stopped 5 processes") == 2  # supervisor, controller, frontend, a worker, the zygote
    assert moectl(env, "list").stdout.strip() == ""


def test_foreground_up_stops_everything_on_sigterm(env, checkpoints):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moecluster.cli.moectl", "up", "--model", str(checkpoints["qwen3_moe"]),
                             "--workers", "2", "--port", str(port), "--name", "fg"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        folder = Path(env["MOECLUSTER_HOME"]) / "clusters" / "fg"
        lines = []
        for line in proc.stdout:  # bounded: moectl prints this line or exits (then the loop ends)
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        assert (folder / "frontend.json").is_file(), "".join(lines) + (proc.stderr.read() if proc.poll() else "")
        records = [folder / f"{name}.json" for name in ("supervisor", "controller", "frontend", "zygote")]
        pids = [json.loads(p.read_text())["pid"] for p in [*records, *(folder / "workers").glob("*.json")]]
        assert Client(f"127.0.0.1:{port}").forward(torch.tensor([[1]])).shape == (1, 1, 128)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped 6 processes" in out, (proc.returncode, out)
    assert wait_gone(pids) == []


@pytest.mark.parametrize("args, fragment", [
    (["up", "--model", "{empty}", "--port", "0"], "no config.json"),
    (["up", "--model", "{model}", "--workers", "2", "--replicas", "3"], "--replicas must be between 1 and --workers"),
    (["up", "--model", "{model}", "--workers", "0"], "--workers must be at least 1"),
    (["up", "--model", "{model}", "--rebalance-above", "1"], "--rebalance-above must be over 1"),
    (["up", "--model", "{model}", "--rebalance-min-load", "-1"], "--rebalance-min-load is tokens/s"),
    (["up", "--model", "{model}", "--replicas", "2", "--max-replicas", "1"], "--max-replicas (1) is below --replicas"),
    (["up", "--model", "{model}", "--port", "{busy}"], "is in use"),
    (["up", "--model", "{model}", "--worker-batch-tokens", "-1"], "--worker-batch-tokens is tokens a call, at least 0"),
    (["up", "--model", "{model}", "--worker-compute-threads", "0"], "--worker-compute-threads must be at least 1"),
    (["up", "--model", "{model}", "--generate-cache-tokens", "10"], "at least one 32-token page; got 10"),
    (["up", "--model", "{model}", "--forward-batch-tokens", "-2"], "--forward-batch-tokens is tokens a forward"),
    (["up", "--model", "{model}", "--name", "bad/name"], "use letters, digits"),
    (["up", "--model", "{model}", "--worker-device", "tpu"], "--worker-device 'tpu': not a device"),
    (["up", "--model", "{model}", "--worker-device", "cuda:99"], "--worker-device cuda:99: "),  # no GPU, or too few
    (["up", "--model", "{model}", "--frontend-device", "gpu"], "--frontend-device 'gpu': not a device"),
    (["up", "--model", "{model}", "--frontend-device", "cuda:99"], "--frontend-device cuda:99: "),
    (["up", "--model", "{model}", "--api-keys", "{tmp}/no-keys"], "--api-keys: cannot read the API keys file"),
    (["up", "--model", "{model}", "--api-keys", "{tmp}/bad-keys"], "bad-keys, line 2: 'requests-per-second=0' is not"),
    (["up", "--model", "{model}", "--tls-cert", "{tmp}/cert.pem"], "TLS needs both --tls-cert and --tls-key"),
    (["up", "--model", "{model}", "--backend", "ray", "--api-keys", "{tmp}/keys"], "are the local frontend's"),
    (["down", "--name", "nothing"], "no cluster named 'nothing'"),
    (["status", "--name", "nothing"], "no cluster named 'nothing'"),
    (["train", "--name", "nothing", "--out", "{tmp}/t"], "no cluster named 'nothing'"),
    (["train", "--controller", "127.0.0.1:1", "--out", "{tmp}/t"], "--controller needs --model"),
    (["train", "--controller", "127.0.0.1:1", "--model", "{model}", "--resume", "auto", "--out", "{tmp}/t"],
     "--resume auto needs --until STEP"),
    (["train", "--controller", "127.0.0.1:1", "--model", "{model}", "--resume", "auto", "--until", "9", "--out",
      "{tmp}/t"], "--resume auto with --controller needs --save-dir"),
    (["train", "--controller", "127.0.0.1:1", "--model", "{model}", "--until", "0", "--out", "{tmp}/t"],
     "until >= 1"),
    (["snapshot", "--name", "nothing"], "no cluster named 'nothing'"),
    (["restore", "--name", "nothing"], "no cluster named 'nothing'"),
    (["model", "create", "--family", "gpt2", "--out", "{tmp}/x"], "unknown family 'gpt2'"),
    (["model", "create", "--family", "mixtral", "--out", "{tmp}/y", "--experts", "2", "--top-k", "3"], "top_k"),
])
def test_errors_say_what_to_do(tmp_path, env, checkpoints, args, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad-keys").write_text("key-a\nkey-b requests-per-second=0\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"empty": tmp_path / "empty", "model": checkpoints["olmoe"], "busy": busy.getsockname()[1],
                  "tmp": tmp_path}
        result = moectl(env, *[a.format(**values) for a in args], check=False, timeout=60)
    assert result.returncode != 0
    assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_training_examples_job_is_a_restartable_moectl_train():
    """The apiserver e2e checks the manifest's schema; this checks its trainer's arguments are moectl's."""
    docs = yaml.safe_load_all((Path(__file__).parents[1] / "examples" / "moecluster-training.yaml").read_text())
    job = next(d for d in docs if d and d["kind"] == "Job")
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    assert trainer["command"][:3] == ["python", "-m", "moecluster.cli.moectl"]
    args = build_parser().parse_args(trainer["command"][3:] + trainer["args"])
    assert (args.func.__name__, args.resume, args.until, args.save_dir) == ("cmd_train", "auto", 1000, "/snapshots")
    assert job["spec"]["backoffLimit"] > 0


def test_an_up_that_fails_keeps_the_logs_it_names_and_the_name_can_be_used_again(tmp_path, env, checkpoints):
    model = str(checkpoints["olmoe"])
    failed = moectl(env, "up", "--model", model, "--workers", "2", "--port", "0", "--timeout", "0.5", "--detach",
                    check=False)
    assert failed.returncode != 0 and "not serving after 0.5s" in failed.stderr and "Traceback" not in failed.stderr
    logs = Path(failed.stderr.split("logs in ", 1)[1].split(";")[0].strip())
    assert (logs / "controller.log").is_file(), failed.stderr
    assert not (logs.parent / "cluster.json").exists(), "a failed cluster is not listed"
    assert moectl(env, "list").stdout.strip() in ("", "no clusters")
    moectl(env, "up", "--model", model, "--workers", "1", "--port", "0", "--detach", "--rebalance-min-load", "7",
           "--max-replicas", "1")
    try:
        assert json.loads(moectl(env, "status", "-o", "json").stdout)["converged"]
        spec = json.loads((Path(env["MOECLUSTER_HOME"]) / "clusters" / "default" / "spec.json").read_text())
        assert (spec["rebalance_min_load"], spec["max_replicas"]) == (7, 1)
    finally:
        moectl(env, "down")


def test_train_and_snapshot_from_the_command_line(tmp_path, env):
    """Mixtral this time (the SDK tests train Qwen3-MoE): `moectl train` equals plain PyTorch."""
    model = tmp_path / "tiny-mixtral"
    moectl(env, "model", "create", "--family", "mixtral", "--out", str(model))
    moectl(env, "up", "--model", str(model), "--workers", "2", "--replicas", "2", "--port", "0", "--detach",
           "--snapshot-dir", str(tmp_path / "snaps"), "--snapshot-keep", "2")
    try:
        bad = moectl(env, "train", "--steps", "0", "--out", str(tmp_path / "x"), check=False)
        assert bad.returncode != 0 and "steps >= 1" in bad.stderr and "Traceback" not in bad.stderr
        nowhere = moectl(env, "train", "--steps", "4", "--batch", "2", "--seq", "8", "--save-every", "2",
                         "--save-dir", str(tmp_path / "no" / "such"), "--out", str(tmp_path / "x"), check=False)
        assert nowhere.returncode == 1 and "Traceback" not in nowhere.stderr, nowhere.stderr
        assert f"cannot save into {tmp_path / 'no' / 'such'}: worker-" in nowhere.stderr, nowhere.stderr
        assert "is not a directory on this worker" in nowhere.stderr and "step 1/4" not in nowhere.stderr  # before any step
        run = moectl(env, "train", "--steps", "4", "--batch", "2", "--seq", "8", "--lr", "1e-3", "--out", str(tmp_path / "run"))
        assert "step 4/4" in run.stderr and "final" in run.stdout
        snap = moectl(env, "snapshot")
        assert "snapshot of step 4: 16 experts" in snap.stderr, snap.stderr
        assert "training: step 4, last snapshot" in moectl(env, "status").stdout
        # save the whole training state, roll the pool back, resume from the save
        more = moectl(env, "train", "--steps", "2", "--batch", "2", "--seq", "8", "--save-every", "2",
                      "--out", str(tmp_path / "more"))
        assert "step 6/6" in more.stderr and (tmp_path / "snaps" / "step-00000006" / "trainer.pt").is_file()
        listed = moectl(env, "snapshots").stdout.splitlines()
        assert [line.split()[:2] for line in listed] == [["step", "6"], ["step", "4"]], listed
        assert "+ trainer state" in listed[0] and "experts only" in listed[1] and "16 experts" in listed[1]
        assert moectl(env, "snapshots", "--dir", str(tmp_path / "snaps")).stdout.splitlines() == listed  # read here
        missing = moectl(env, "restore", str(tmp_path / "nowhere"), check=False)
        assert missing.returncode != 0 and "no snapshot there" in missing.stderr and "Traceback" not in missing.stderr
        back = moectl(env, "restore", str(tmp_path / "snaps" / "step-00000004"))
        assert "every expert back at step 4 (2 updates undone)" in back.stderr, back.stderr
        assert "restored: step 4 from" in moectl(env, "status").stdout
        resumed = moectl(env, "train", "--steps", "1", "--batch", "2", "--seq", "8", "--resume", str(tmp_path / "snaps"),
                         "--out", str(tmp_path / "more"))
        assert "step 7/7" in resumed.stderr, resumed.stderr  # from the newest save (step 6), not step 4
        assert [json.loads(line)["step"] for line in (tmp_path / "more" / "metrics.jsonl").read_text().splitlines()] \
            == [4, 5, 6]
        moectl(env, "snapshot")  # step 7: with --snapshot-keep 2, step 4 goes (6 stays, newest and a resume's)
        assert [line.split()[1] for line in moectl(env, "snapshots").stdout.splitlines()] == ["7", "6"]
        # a job that restarts itself: from the newest save with a trainer state (6; 7 is the experts' only),
        # into the cluster's --snapshot-dir, until step 8, ending with a save
        auto = moectl(env, "train", "--resume", "auto", "--until", "8", "--batch", "2", "--seq", "8",
                      "--out", str(tmp_path / "more"))
        assert "the pool has made 6 of 8 updates; 2 to go" in auto.stderr, auto.stderr
        assert (tmp_path / "snaps" / "step-00000008" / "trainer.pt").is_file()
        assert [json.loads(line)["step"] for line in (tmp_path / "more" / "metrics.jsonl").read_text().splitlines()] \
            == [4, 5, 6, 7]
    finally:
        moectl(env, "down")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32).state_dict()
    eager, eager_losses = _train_in_process(model, fused=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers compute (`up`'s --worker-threads): a sum split across threads rounds apart
    try:
        fused, _ = _train_in_process(model, fused=True)
    finally:
        torch.set_num_threads(threads)
    for row, step, expected in zip(rows, range(4), eager_losses, strict=True):
        assert row["step"] == step and abs(row["loss"] - expected) <= 1e-4 * expected
    # The cluster adds nothing to the numbers: the same steps in one process with the workers' kernel agree
    # to float rounding. Against transformers' eager experts, Adam turns rounding into up to ~lr per step
    # on weights whose gradient is zero but for noise (the router rows of unselected experts).
    assert max((trained[k] - v).abs().max().item() for k, v in fused.items()) <= 1e-6
    assert max((trained[k] - v).abs().max().item() for k, v in eager.items()) <= 1e-3


def _train_in_process(path, fused: bool):
    """4 steps of moectl train's loop on transformers' model, its experts eager or through fused_experts."""
    import types

    from moecluster.cli.train import batch_for
    from moecluster.workers.kernels import fused_experts

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    if fused:
        for name, module in model.named_modules():
            if name.endswith("mlp.experts"):
                module.forward = types.MethodType(
                    lambda self, h, i, w: fused_experts(h, self.gate_up_proj, self.down_proj, i, w), module)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(4):
        x = batch_for(step, 0, 128, 2, 8)
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.detach() for k, v in model.state_dict().items()}, losses


def test_help_explains_every_command(env):
    out = moectl(env, "--help").stdout
    for command in ["model", "up", "status", "scale", "migrate", "drain", "replace", "down", "list", "demo", "train",
                    "snapshot", "snapshots", "restore"]:
        assert command in out
    assert "--replicas" in moectl(env, "up", "--help").stdout


def test_client_errors_are_clear(checkpoints, env):
    with pytest.raises(ValueError, match="host:port"):
        Client("localhost")
    with pytest.raises(MoEClusterError, match="no frontend reachable"):
        Client(f"127.0.0.1:{free_port()}", timeout=3).forward(torch.tensor([[1, 2]]))
    port = free_port()
    moectl(env, "up", "--model", str(checkpoints["olmoe"]), "--workers", "1", "--port", str(port), "--detach",
           "--name", "errs")
    try:
        with Client(f"127.0.0.1:{port}") as client:
            with pytest.raises(MoEClusterError, match=r"token ids must be in \[0, 127\]"):
                client.forward(torch.tensor([[1, 500]]))
            with pytest.raises(TypeError, match="integer token ids"):
                client.forward(torch.tensor([[1.5]]))
            with pytest.raises(MoEClusterError, match="max_new_tokens"):
                client.generate(torch.tensor([[1]]), max_new_tokens=0)
            assert client.forward(torch.tensor([[1, 2]])).shape == (1, 2, 128), "still serving after bad requests"
        reached = Client(f"127.0.0.1:{port}", timeout=3)
        reached.forward(torch.tensor([[1, 2]]))
    finally:
        moectl(env, "down", "--name", "errs")
    with pytest.raises(MoEClusterError, match=r"UNAVAILABLE: .*\(retried for \d+s\)"):
        reached.forward(torch.tensor([[1, 2]]))  # its frontend is gone for good: retried within its timeout
    reached.close()


def test_large_logits_stream_back_in_chunks(env, tmp_path):
    """Logits above the 1 MiB unary threshold come back through ForwardStream, equal to transformers."""
    model = tmp_path / "wide-vocab"
    moectl(env, "model", "create", "--family", "olmoe", "--out", str(model), "--vocab", "4096")
    port = free_port()
    moectl(env, "up", "--model", str(model), "--workers", "2", "--port", str(port), "--detach", "--name", "wide")
    try:
        batch = torch.randint(0, 4096, (4, 160), generator=torch.Generator().manual_seed(2))  # 10 MiB of logits
        with Client(f"127.0.0.1:{port}") as client:
            assert client.info().vocab_size == 4096
            logits = client.forward(batch)
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (logits - reference(batch).logits).abs().max() <= 1e-4
    finally:
        moectl(env, "down", "--name", "wide")


def worker_stats(address: str):
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.ExpertWorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=10)
