"""Data-parallel trainers stepping one pool (sdk/data_parallel.py): two trainer processes, each on half
of every batch, train exactly as one process trains on the whole batch with plain PyTorch; a step cut
at one trainer is redone by both; a trainer's bug stops both without applying half a step; and
`moectl train` takes the group from torchrun's environment. The trainers meet through a file and
gloo on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared import assert_trained_like, plain_pytorch_training, wait_for

STEPS, BATCH, SEQ, LR, SEED = 8, 4, 8, 1e-3, 3
HELPER = Path(__file__).with_name("data_parallel_trainer.py")
TRAINERS_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints["qwen3_moe"]


@pytest.fixture(scope="module")
def reference(path):
    """One process, the whole batch, plain PyTorch: the loss of every step and the weights at the end."""
    losses, states = plain_pytorch_training(path, STEPS, BATCH, SEQ, LR, SEED, keep=(STEPS,))
    return losses, states[STEPS]


def environment() -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "TRANSFORMERS_VERBOSITY": "error"}


def start_trainers(c, tmp_path, steps=STEPS, **faults) -> list[subprocess.Popen]:
    """Two trainer processes against cluster `c`; faults: {rank: {"cut_at": s, ...}}."""
    common = ["--init", f"file://{tmp_path / 'meet'}", "--controller", c.status()["controller"],
              "--model", c.info()["model"], "--world", "2", "--steps", str(steps), "--batch", str(BATCH),
              "--seq", str(SEQ), "--seed", str(SEED), "--lr", str(LR)]
    procs = []
    for rank in range(2):
        extra = [x for k, v in faults.get(f"rank{rank}", {}).items() for x in (f"--{k.replace('_', '-')}", str(v))]
        procs.append(subprocess.Popen(
            [sys.executable, str(HELPER), *common, "--rank", str(rank), "--out", str(tmp_path / f"run{rank}"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment()))
    return procs


def finish(procs) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        try:
            text, _ = proc.communicate(timeout=TRAINERS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("the trainers did not finish: " + proc.communicate()[0][-3000:]) from None
        out.append((proc.returncode, text))
    return out


def assert_matches(run: Path, reference) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    assert_trained_like(rows, reference[0], run / "final", reference[1])


def test_two_trainers_on_half_batches_equal_one_on_the_whole_through_a_cut_step_and_a_kill(local_clusters, path,
                                                                                           reference, tmp_path):
    c = local_clusters("dp", path, 3, 2)
    victim = [w for w in c.status()["workers"] if w["state"] == "serving"][0]
    (zero, out0), (one, out1) = finish(start_trainers(
        c, tmp_path, rank1={"cut_at": 2}, rank0={"kill_at": 5, "kill_pid": victim["pid"]}))
    assert zero == 0 and one == 0, out0[-3000:] + out1[-3000:]
    assert_matches(tmp_path / "run0", reference)
    assert not (tmp_path / "run1").exists()  # the first trainer writes for the group
    # The cut was rank 1's alone; rank 0 redid the step because the group agreed to.
    assert "step 3: ExpertUnavailableError: injected" in out1, out1[-3000:]
    assert "step 3: another trainer of the group lost a worker; redoing it" in out0, out0[-3000:]
    assert victim["id"] not in {w["id"] for w in c.status()["workers"] if w["state"] == "serving"}
    assert wait_for(lambda: c.status()["step"] == STEPS, timeout=10)


def test_a_trainers_bug_stops_the_group_without_applying_half_a_step(local_clusters, path, tmp_path):
    c = local_clusters("dpfail", path, 2, 1)
    (zero, out0), (one, out1) = finish(start_trainers(c, tmp_path, rank1={"fail_at": 3}))
    assert one != 0 and "ValueError: injected" in out1, out1[-3000:]
    assert zero != 0 and "step 4: another trainer of the group failed" in out0, out0[-3000:]
    assert wait_for(lambda: c.status()["step"] == 3, timeout=10) and c.status()["lowest_step"] == 3  # steps 1-3, all of them


@pytest.mark.parametrize("fault, faulty, resumes_at", [("die", 1, 4), ("die", 0, 3), ("hang", 1, 4)],
                         ids=["a-member-dies", "the-leader-dies", "a-member-hangs"])
def test_a_group_that_lost_a_trainer_restarts_smaller_and_ends_as_if_never_stopped(local_clusters, path, reference,
                                                                                  tmp_path, fault, faulty, resumes_at):
    """What torchrun --max-restarts does when a trainer dies or hangs: the others fail (a hung one after
    --dist-timeout), the group starts again (here with one trainer fewer) and `--resume auto` goes on from
    the newest save. When the leader survives, it saves the step the group had reached, and no step is
    redone; when the leader dies, the steps since the last save (3) are."""
    c = local_clusters("dprestart", path, 2, 1)
    saves = tmp_path / "saves"
    saves.mkdir()  # the workers make no folders of their own
    restartable = {"until": STEPS, "save_every": 3, "restart_dir": saves, "timeout": 15}
    procs = start_trainers(c, tmp_path, **{f"rank{faulty}": {**restartable, f"{fault}_at": 4},
                                           f"rank{1 - faulty}": restartable})
    survivor = procs[1 - faulty]
    try:
        said = survivor.communicate(timeout=TRAINERS_TIMEOUT_S)[0]
    finally:
        procs[faulty].kill()  # a hung one is still there
    out0 = said if faulty else procs[0].communicate()[0]
    assert survivor.returncode != 0 and "the trainer group broke during" in said, said[-3000:]
    assert procs[faulty].wait() == -9 and ("Timed out waiting 15000ms" in said) == (fault == "hang"), said[-3000:]
    assert "saved step 0 in" in out0 and "saved step 3 in" in out0 and "saved step 6" not in out0, out0[-3000:]
    assert ("saved step 4 in" in out0) == (resumes_at == 4), out0[-3000:]
    assert wait_for(lambda: c.status()["step"] == 4, timeout=10)  # the cut step 5 was never applied

    restarted = subprocess.run(
        [sys.executable, "-m", "moecluster.cli.moectl", "train", "--controller", c.status()["controller"],
         "--model", c.info()["model"], "--resume", "auto", "--save-dir", str(saves), "--save-every", "3",
         "--until", str(STEPS), "--batch", str(BATCH), "--seq", str(SEQ), "--seed", str(SEED), "--lr", str(LR),
         "--out", str(tmp_path / "run0")], capture_output=True, text=True, env=environment(), timeout=TRAINERS_TIMEOUT_S)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    left = STEPS - resumes_at
    assert f"the pool has made {resumes_at} of {STEPS} updates; {left} to go" in restarted.stderr, restarted.stderr[-3000:]
    assert_matches(tmp_path / "run0", reference)  # the steps before the save kept, those after it redone once
    assert c.status()["step"] == STEPS

    again = subprocess.run(restarted.args, capture_output=True, text=True, env=environment(), timeout=TRAINERS_TIMEOUT_S)
    assert again.returncode == 0 and f"the pool has made {STEPS} of {STEPS} updates\n" in again.stderr, again.stderr


def test_moectl_train_under_torchrun_environment_splits_the_batch(local_clusters, path, reference, tmp_path):
    c = local_clusters("dpcli", path, 2, 1)
    procs = []
    for rank in range(2):
        env = {**environment(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "moecluster.cli.moectl", "train", "--controller", c.status()["controller"],
             "--model", c.info()["model"], "--dist-init", f"file://{tmp_path / 'meet'}", "--steps", str(STEPS),
             "--batch", str(BATCH), "--seq", str(SEQ), "--seed", str(SEED), "--lr", str(LR),
             "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    (zero, out0), (one, out1) = finish(procs)
    assert zero == 0 and one == 0, out0[-3000:] + out1[-3000:]
    assert "metrics in" in out0 and "metrics in" not in out1 and "step 8/8" in out0 and "step 8/8" not in out1
    assert_matches(tmp_path / "run", reference)
