"""The Ray backend's scenarios, run by tests/test_ray.py in a network namespace of their own.

    python tests/ray_scenarios.py --out REPORT.json --qwen3 DIR --mixtral DIR

One local Ray instance for all of them (started as `moectl up --backend ray`
starts one); every cluster is a real `LocalCluster(backend="ray")`: the
controller a detached actor, workers actors, the frontend a Serve application
reached over HTTP. Each scenario writes what it measured into the report; the
tests assert on it. Bounded: every load stops by itself, every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import grpc
import ray
import torch
from moecluster.backends.local import LocalCluster, free_port
from moecluster.backends.processes import spawn, stop
from moecluster.cli.train import train
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.sdk.client import Client
from moecluster.sdk.load import ClosedLoopLoad
from moecluster.wire import endpoints
from transformers import AutoModelForCausalLM


def expected(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return batch, model(batch).logits


def serving(status) -> list[dict]:
    return [w for w in status["workers"] if w["state"] == "serving"]


def _answers(c: LocalCluster) -> bool:
    try:
        c.status(rpc_timeout=2)
        return True
    except Exception:  # noqa: BLE001 - not back yet
        return False


def wait_for(check, seconds: float) -> float | None:
    """Seconds until check() held, or None after `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def worker_stats(address: str, tls_folder: str = ""):
    """A worker's Stats; over mutual TLS with the certificates in `tls_folder`, if given."""
    channel = endpoints.internal_channel(address, tls_folder=tls_folder) if tls_folder else grpc.insecure_channel(address)
    with channel:
        return worker_pb2_grpc.ExpertWorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=10)


def refuses_plaintext(address: str) -> bool:
    try:
        worker_stats(address)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.UNAVAILABLE
    return False


def streamed(path: str, http: Client, proxied: Client, c: LocalCluster) -> dict:
    """Sampled GenerateStream through Serve's HTTP ingress and its gRPC proxy against Generate and transformers'
    generate under the seed; then a long stream left after its first tokens, and the worker RPCs that follow."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt, settings = torch.tensor([[3, 1, 4, 1]]), {"do_sample": True, "seed": 5, "temperature": 0.9}
    torch.manual_seed(5)
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                                pad_token_id=0, do_sample=True, temperature=0.9)[0, 4:].tolist()

    def joined(client):
        return [t for _, tokens in client.generate_stream(prompt, 6, **settings) for t in tokens]

    result = {"transformers": theirs, "generate": http.generate(prompt, 6, **settings)[0, 4:].tolist(),
              "http": joined(http), "grpc": joined(proxied)}
    rpcs = lambda: sum(worker_stats(w["address"], c.status()["internal_tls"]).requests  # noqa: E731
                       for w in serving(c.status()))
    chunks = http.generate_stream(prompt, 4000)
    result["first_chunk"] = list(next(chunks)[1])
    chunks.close()  # the HTTP response closed: the replica stops decoding
    time.sleep(1.0)
    before = rpcs()
    time.sleep(2.0)
    result["rpcs_2s_after_cancel"] = rpcs() - before  # a 4000-token generation would make hundreds
    try:
        Client(http.address, timeout=1.0).generate(prompt, 4000)  # gives up after 1 s: Serve cancels the request
        result["generate_timed_out"] = False
    except Exception:  # noqa: BLE001 - the timeout, expected
        result["generate_timed_out"] = True
    time.sleep(1.0)
    before = rpcs()
    time.sleep(2.0)
    result["rpcs_2s_after_timeout"] = rpcs() - before
    return result


def load(c: LocalCluster, batch, logits):
    return ClosedLoopLoad(c.status()["endpoint"], batch, logits, clients=2, max_seconds=240)


def summary(report) -> dict:
    return {"ok": report.ok, "failed": report.failed, "wrong": report.wrong, "errors": [str(e) for e in report.errors[:3]]}


def run(args) -> dict:
    out: dict = {}
    root = args.out.parent  # the test's own temporary folder: pytest keeps the last few runs' logs, no more
    os.environ["MOECLUSTER_HOME"] = str(root / "home")
    for sub in ("run", "logs"):
        (root / sub).mkdir()
    head = spawn("ray-head", "moecluster.backends.ray_head", ["--num-cpus", "16"], root / "run", root / "logs", 180)
    clusters = []
    grpc_port = free_port()  # Serve's gRPC proxy; the first cluster's settings start Serve
    try:
        for family, path in (("qwen3_moe", args.qwen3), ("mixtral", args.mixtral)):
            batch, logits = expected(path)
            started = time.monotonic()
            c = LocalCluster(family.replace("_", "-"))
            # the second cluster's actors and Serve replicas take the spec's serving settings, and its parts call
            # each other over mutual TLS (the actors and replicas get the certificates with their arguments)
            settings = ({"worker_batch_tokens": 0, "generate_cache_tokens": 64, "forward_batch_tokens": 0,
                         "internal_tls": True} if family == "mixtral" else {})
            c.up(path, workers=2, replicas=2, port=0, backend="ray", ray_address=head.address, serve_grpc_port=grpc_port,
                 snapshot_dir=root / "snaps" if family == "qwen3_moe" else None, **settings)
            clusters.append(c)
            client = Client(c.status()["endpoint"], timeout=60)
            got = client.forward(batch)
            # the same application through Serve's gRPC proxy (it serves both: the metadata picks one)
            by_grpc = Client(f"127.0.0.1:{grpc_port}", timeout=60, application=c.name).forward(batch)
            tls = c.status()["internal_tls"]
            stats = [worker_stats(w["address"], tls) for w in serving(c.status())]
            if tls:
                out["internal_tls"] = {"refused": [refuses_plaintext(w["address"]) for w in serving(c.status())]}
            out[f"stream/{family}"] = streamed(path, client, Client(f"127.0.0.1:{grpc_port}", timeout=60,
                                                                    application=c.name), c)
            out[f"equal/{family}"] = {"max_err": float((got - logits).abs().max()), "up_s": time.monotonic() - started,
                                      "grpc_max_err": float((by_grpc - logits).abs().max()),
                                      "endpoint": c.status()["endpoint"],
                                      "generate_cache_tokens": client.info().generate_cache_tokens,
                                      "forward_batch_tokens": client.info().forward_batch_tokens,
                                      "worker_requests": sum(s.requests for s in stats),
                                      "worker_forward_batches": sum(s.forward_batches for s in stats)}

        c, (batch, logits) = clusters[1], expected(args.mixtral)  # mutual TLS: a new worker actor, experts copied to it
        with load(c, batch, logits) as running:
            list(c.scale(3))
            three = len(serving(c.status()))
            list(c.scale(2))
        out["internal_tls"] |= {**summary(running.report), "workers_at_3": three,
                                "refused_after": [refuses_plaintext(w["address"]) for w in serving(c.status())]}

        c = clusters[0]
        batch, logits = expected(args.qwen3)
        with load(c, batch, logits) as running:
            time.sleep(1)
            started = time.monotonic()
            list(c.scale(3))
            up_s = time.monotonic() - started
            three = len(serving(c.status()))
            list(c.scale(2))
            time.sleep(1)
        out["scale"] = {**summary(running.report), "workers_at_3": three, "workers_after": len(serving(c.status())),
                        "scale_up_s": up_s}

        with load(c, batch, logits) as running:
            time.sleep(1)
            victim = serving(c.status())[0]
            os.kill(victim["pid"], signal.SIGKILL)
            back = wait_for(lambda: len(serving(c.status())) == 2 and victim["id"] not in
                            {w["id"] for w in serving(c.status())}, 60)
            time.sleep(1)
        out["kill"] = {**summary(running.report), "victim": victim["id"], "back_to_spec_s": back}

        before = c.status()
        with load(c, batch, logits) as running:
            time.sleep(1)
            ray.kill(ray.get_actor(f"{c.name}/controller", namespace="moecluster"))  # the controller crashes
            time.sleep(1)
            served_without = running.report.ok
            c.start_controller()  # moectl resume
            c.wait_converged(120, lambda line: None)
            time.sleep(1)
        after = c.status()
        out["controller_restart"] = {
            **summary(running.report), "served_without_controller": served_without,
            "workers_before": sorted(w["id"] for w in serving(before)), "workers_after": sorted(w["id"] for w in serving(after)),
            "epoch_before": before["epoch"], "epoch_after": after["epoch"]}

        list(c.scale(3))
        three = sorted(w["id"] for w in serving(c.status()))
        oldest = min(three, key=lambda w: int(w.rsplit("-", 1)[1]))  # left to itself, a shrink empties the newest
        drain_lines, drain_errors, drain_began = [], [], threading.Event()

        def drain():
            try:
                for line in c.drain(oldest):
                    drain_lines.append(line)
                    drain_began.set()
            except Exception as err:  # noqa: BLE001 - reported, and asserted on by the test
                drain_errors.append(f"{type(err).__name__}: {err}")

        with load(c, batch, logits) as running:
            time.sleep(1)
            crashed = controller_pid(c.name)
            draining = threading.Thread(target=drain)
            draining.start()
            drain_began.wait(30)  # "draining worker-N": the spec names it, nothing has moved yet
            lines_at_kill, started = list(drain_lines), time.monotonic()
            os.kill(crashed, signal.SIGKILL)  # mid-drain, the controller's process dies: Ray starts the actor again
            restarted = wait_for(lambda: controller_pid(c.name) not in (None, crashed), 120)
            answering = wait_for(lambda: _answers(c), 120)
            answering = None if answering is None else time.monotonic() - started
            draining.join(180)
            c.wait_converged(120, lambda line: None)
            time.sleep(1)
        after = c.status()
        out["controller_crash"] = {**summary(running.report), "restarted_s": restarted, "answering_s": answering,
                                   "controller": after["controller"], "controller_before": before["controller"],
                                   "workers": sorted(w["id"] for w in serving(after)), "workers_before_drain": three,
                                   "drained": oldest, "drain_lines": drain_lines, "drain_errors": drain_errors,
                                   "lines_at_kill": lines_at_kill}

        c = clusters[0]  # last, as it changes the experts: train, save through the worker actors, resume from a save
        controller = c.status()["controller"]
        first = train(controller, args.qwen3, steps=4, batch=2, seq=8, lr=1e-3, seed=0, out=root / "run", save=False,
                      progress=lambda line: None, save_every=2)
        again = train(controller, args.qwen3, steps=2, batch=2, seq=8, lr=1e-3, seed=0, out=root / "run", save=False,
                      progress=lambda line: None, resume=root / "snaps" / "step-00000002")
        out["training"] = {"first": {r["step"]: r["loss"] for r in first}, "again": {r["step"]: r["loss"] for r in again},
                           "snapshots": [(x["step"], x["trainer_state"]) for x in c.status(list_snapshots=True)["snapshots"]],
                           "restored": c.status()["restored"]}

        out["port_taken"] = controller_port_taken(args.qwen3, head.address)

        for c in clusters:
            stopped = c.down()
            out.setdefault("down", {})[c.name] = {"stopped": [str(s) for s in stopped]}
        left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "moecluster"]
        out["down"]["actors_left"] = left
        clusters = []
    except Exception:  # noqa: BLE001 - the report says what broke; the tests fail on it
        out["error"] = traceback.format_exc()
    finally:
        for c in clusters:
            try:
                c.down()
            except Exception:  # noqa: BLE001
                pass
        ray.shutdown()  # this driver lets go of the Ray instance before it stops (else it ends this process)
        stop(head, 30)
    if "error" not in out:
        try:
            out["cli"] = cli_with_its_own_ray(args.qwen3, root)
        except Exception:  # noqa: BLE001
            out["error"] = traceback.format_exc()
    return out


def controller_pid(name: str) -> int | None:
    try:
        return ray.get(ray.get_actor(f"{name}/controller", namespace="moecluster").info.remote(), timeout=5)[1]
    except Exception:  # noqa: BLE001 - gone, restarting, or not answering yet
        return None


def controller_port_taken(path: str, ray_address: str) -> dict:
    """`up` picks the controller's port before the actor binds it; another process may bind it first (Ray's own
    do, picking ports as they start). Here one has: `up` must move the new controller to another port."""
    from moecluster.backends import local

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = iter([taken.getsockname()[1]])  # the controller's pick (the frontend's port is given)
    real = local.free_port
    local.free_port = lambda: next(picks, None) or real()
    c = LocalCluster("taken")
    try:
        c.up(path, workers=1, port=real(), backend="ray", ray_address=ray_address)
        return {"taken": taken.getsockname()[1], "controller": c.status()["controller"],
                "workers": len(serving(c.status()))}
    finally:
        local.free_port = real
        taken.close()
        c.down()


def cli_with_its_own_ray(path: str, root: Path) -> dict:
    """`moectl up --backend ray` with no --address starts Ray on this machine; `moectl down` stops it all."""
    env = {**os.environ, "MOECLUSTER_HOME": str(root / "cli-home")}

    def moectl(*argv):
        result = subprocess.run([sys.executable, "-m", "moecluster.cli.moectl", *argv], env=env, capture_output=True,
                                text=True, timeout=300)
        return result.returncode, result.stdout + result.stderr

    code, up = moectl("up", "--model", path, "--workers", "2", "--backend", "ray", "--port", "0", "--detach", "--name", "cli")
    head = json.loads((root / "cli-home" / "clusters" / "cli" / "ray-head.json").read_text())["pid"] if code == 0 else 0
    status = json.loads(moectl("status", "--name", "cli", "-o", "json")[1]) if code == 0 else {}
    down_code, down = moectl("down", "--name", "cli")
    time.sleep(1)
    return {"up": code, "up_output": up[-2000:], "workers": len(serving(status)) if status else 0,
            "endpoint": status.get("endpoint", ""), "down": down_code, "down_output": down[-500:],
            "head_alive_after_down": head > 0 and os.path.exists(f"/proc/{head}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--qwen3", required=True)
    parser.add_argument("--mixtral", required=True)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    report = run(args)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    sys.exit(0)


if __name__ == "__main__":
    main()
