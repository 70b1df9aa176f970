"""The Ray backend on a real local Ray instance: answers equal to transformers for two families (through
Serve's HTTP ingress and its gRPC proxy; streamed generations too, stopped when their reader leaves), one
cluster's parts on mutual TLS, scale 2 -> 3 -> 2 under load, kill -9 of a worker actor's process under
load, the controller actor killed and restarted, training saved through the worker actors and resumed
exactly, `down` leaving no actor behind.

Ray's own servers (GCS, raylet, workers, agents) listen on every interface of their network namespace,
so the scenarios (tests/ray_scenarios.py) run in a namespace of their own that has only loopback: nothing
they start is reachable from outside the machine. One Ray instance serves all of them; the tests read
what each scenario measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)  # one Ray instance and five clusters' worth of scenarios, on 2 cores


def _isolated() -> list[str] | None:
    """A command prefix that runs in a fresh network namespace with loopback up; None where that is not allowed."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True)
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"'] if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def report(checkpoints, tmp_path_factory):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the Ray backend's tests need Ray: pip install -e '.[ray]' (make test does)")
    prefix = _isolated()
    if prefix is None:
        pytest.skip("needs `unshare -n` (root or user namespaces) to give Ray a loopback-only network namespace")
    out = tmp_path_factory.mktemp("ray") / "report.json"
    cmd = [*prefix, sys.executable, str(Path(__file__).with_name("ray_scenarios.py")), "--out", str(out),
           "--qwen3", str(checkpoints["qwen3_moe"]), "--mixtral", str(checkpoints["mixtral"])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.is_file(), f"no report ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert "error" not in doc, doc["error"]
    return doc


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_answers_equal_transformers(report, family):
    result = report[f"equal/{family}"]
    assert result["max_err"] <= 1e-4 and result["grpc_max_err"] <= 1e-4, result
    assert result["endpoint"].startswith("http://127.0.0.1:"), "the frontend is a Serve application on loopback"
    # mixtral's `up` set the serving settings: its worker actors compute each request alone, and its
    # replicas keep a 64-token generation cache and compute each Forward alone; qwen3's keep the defaults
    assert result["worker_requests"] > 0, result
    assert (result["worker_forward_batches"] > 0, result["generate_cache_tokens"], result["forward_batch_tokens"]) == (
        (False, 64, 0) if family == "mixtral" else (True, 4096, 2048)), result


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_streamed_generations_through_serve_equal_generate_and_stop_when_left(report, family):
    result = report[f"stream/{family}"]
    assert result["http"] == result["grpc"] == result["generate"] == result["transformers"], result
    assert len(result["first_chunk"]) == 1, result  # a token at a time
    assert result["rpcs_2s_after_cancel"] < 20, result
    assert result["generate_timed_out"] and result["rpcs_2s_after_timeout"] < 20, result  # unary Generate too


def test_a_cluster_with_internal_tls_serves_and_scales_and_its_worker_actors_refuse_plaintext(report):
    """The mixtral cluster: `up(internal_tls=True)`; its answers (equal above, streamed too) crossed mutual TLS."""
    result = report["internal_tls"]
    assert result["refused"] == [True, True] and result["refused_after"] == [True, True], result
    assert result["ok"] > 0 and result["failed"] == 0 and result["wrong"] == 0 and result["workers_at_3"] == 3, result


def test_scale_two_three_two_under_load_fails_nothing(report):
    result = report["scale"]
    assert result["ok"] > 0 and result["failed"] == 0 and result["wrong"] == 0, result
    assert result["workers_at_3"] == 3 and result["workers_after"] == 2, result


def test_kill_minus_nine_of_a_worker_actor_fails_nothing(report):
    result = report["kill"]
    assert result["ok"] > 0 and result["failed"] == 0 and result["wrong"] == 0, result
    assert result["back_to_spec_s"] is not None, f"the pool did not get back to 2 serving workers: {result}"


def test_a_restarted_controller_actor_rebuilds_its_state_from_the_workers(report):
    result = report["controller_restart"]
    assert result["failed"] == 0 and result["wrong"] == 0 and result["served_without_controller"] > 0, result
    assert result["workers_after"] == result["workers_before"], "the same workers, found by their actor names"
    assert result["epoch_after"] >= result["epoch_before"], "epochs never go back"


def test_a_controller_actor_crashed_mid_drain_is_started_again_by_ray_and_drains_the_same_worker(report):
    result = report["controller_crash"]
    assert result["restarted_s"] is not None, f"no controller actor came back by itself: {result}"
    assert result["failed"] == 0 and result["wrong"] == 0 and result["ok"] > 0, result
    assert result["controller"] == result["controller_before"], "frontends reconnect to the address they know"
    assert not any(line.startswith("done:") for line in result["lines_at_kill"]), "the drain ended before the kill"
    assert not result["drain_errors"], result  # the drain call was asked again and returned
    assert any("the controller stopped answering" in line for line in result["drain_lines"]), result
    assert result["workers"] == sorted(set(result["workers_before_drain"]) - {result["drained"]}), result


def test_training_saves_through_worker_actors_and_resumes_exactly(report):
    result = report["training"]
    first, again = ({int(k): v for k, v in result[key].items()} for key in ("first", "again"))
    assert sorted(first) == [0, 1, 2, 3] and sorted(again) == [2, 3], result
    assert all(abs(again[s] - first[s]) <= 1e-5 * abs(first[s]) for s in again), result  # steps 2, 3 redone exactly
    assert [tuple(x) for x in result["snapshots"]] == [(4, True), (2, True)], result  # listed by a worker actor
    assert result["restored"].startswith("step 2 from"), result


def test_a_new_controller_whose_port_was_taken_moves_to_another(report):
    result = report["port_taken"]
    assert result["workers"] == 1 and not result["controller"].endswith(f":{result['taken']}"), result


def test_down_leaves_no_actor_behind(report):
    assert report["down"]["actors_left"] == [], report["down"]
    assert "controller" in report["down"]["qwen3-moe"]["stopped"], report["down"]


def test_moectl_up_without_an_address_starts_and_down_stops_a_ray_of_its_own(report):
    result = report["cli"]
    assert result["up"] == 0, result["up_output"]
    assert result["workers"] == 2 and result["endpoint"].startswith("http://127.0.0.1:"), result
    assert result["down"] == 0 and not result["head_alive_after_down"], result


def test_the_core_and_the_local_backend_import_nothing_of_ray():
    code = ("import sys, moecluster.backends.local, moecluster.backends.local_controller, moecluster.cli.moectl, "
            "moecluster.controller.runtime, moecluster.frontend.server, moecluster.workers.server, "
            "moecluster.sdk.training; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
