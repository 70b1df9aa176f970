"""Mutual TLS between a cluster's parts (wire/internal_tls.py): a worker or controller serves only callers
presenting a certificate of its cluster's CA, and a cluster made with `internal_tls` serves, scales and moves
experts with every internal call over it, answering what transformers answers."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys

import grpc
import pytest
import torch
from moecluster.protos import controller_pb2, controller_pb2_grpc, worker_pb2, worker_pb2_grpc
from moecluster.sdk.client import Client
from moecluster.sdk.load import ClosedLoopLoad
from moecluster.wire import bulk, endpoints, internal_tls
from moecluster.wire.bulk import BulkSender
from moecluster.workers.server import WorkerServer
from transformers import AutoModelForCausalLM


def refused(channel: grpc.Channel, call=lambda ch: worker_pb2_grpc.ExpertWorkerStub(ch).Stats(
        worker_pb2.StatsRequest(), timeout=5)) -> bool:
    with channel:
        try:
            call(channel)
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.UNAVAILABLE
    return False


def stats(channel: grpc.Channel) -> worker_pb2.StatsReply:
    with channel:
        return worker_pb2_grpc.ExpertWorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=10)


def test_a_worker_with_the_cluster_certificates_serves_only_callers_presenting_one(qwen3, tmp_path, monkeypatch):
    ours, theirs = internal_tls.generate(tmp_path / "ours", "a"), internal_tls.generate(tmp_path / "theirs", "b")
    monkeypatch.setenv(internal_tls.ENV, str(ours))
    server = WorkerServer(qwen3, [(0, 0)]).start()
    try:
        assert stats(endpoints.internal_channel(server.address)).held[0].expert == 0  # the env's certificates
        assert refused(grpc.insecure_channel(server.address)), "plaintext must be refused"
        ca_only = grpc.ssl_channel_credentials(root_certificates=(ours / "ca.crt").read_bytes())
        assert refused(grpc.secure_channel(server.address, ca_only, options=[
            ("grpc.ssl_target_name_override", internal_tls.SERVER_NAME)])), "TLS without a client certificate"
        assert refused(endpoints.internal_channel(server.address, tls_folder=theirs)), "another cluster's CA"

        # Renewed in place (a Secret updated by cert-manager): the next handshake uses the new files
        old = shutil.copytree(ours, tmp_path / "old")
        internal_tls.generate(ours, "a")
        assert stats(endpoints.internal_channel(server.address, tls_folder=ours)).held
        assert refused(endpoints.internal_channel(server.address, tls_folder=old)), "the replaced CA still admitted"
    finally:
        server.stop(0)


def test_bulk_copies_speak_mutual_tls_and_a_caller_without_the_clusters_certificate_gets_nothing(tmp_path, monkeypatch):
    ours, theirs = internal_tls.generate(tmp_path / "ours", "a"), internal_tls.generate(tmp_path / "theirs", "b")
    monkeypatch.setenv(internal_tls.ENV, str(ours))
    sender = BulkSender("127.0.0.1", 0).start()
    try:
        weights = [torch.randn(64, 32), torch.arange(100, dtype=torch.int32)]
        got = bulk.receive("127.0.0.1", sender.offer(weights), timeout=10, limit_bytes=1 << 20)
        assert all(torch.equal(a, b) for a, b in zip(got, weights)) and sender.pending() == 0

        ticket = sender.offer(weights)
        with socket.create_connection(("127.0.0.1", ticket.port), timeout=10) as plain:
            plain.sendall(ticket.token)  # the token in the clear: not a TLS handshake, so never read as one
            try:
                answer = plain.recv(1 << 16)
            except ConnectionResetError:
                answer = b""
            assert answer == b"", "plaintext got bytes"
        other = internal_tls.socket_context(theirs, server_side=False)
        with socket.create_connection(("127.0.0.1", ticket.port), timeout=10) as raw, pytest.raises(ssl.SSLError):
            with other.wrap_socket(raw, server_hostname=internal_tls.SERVER_NAME) as wrapped:
                wrapped.sendall(ticket.token)
                wrapped.recv(1)
        assert sender.pending() == 1, "the offer must wait for a caller of this cluster"
        got = bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=1 << 20)
        assert torch.equal(got[0], weights[0])
    finally:
        sender.close()


def test_a_folder_missing_a_file_is_refused_at_start(tmp_path, monkeypatch):
    folder = internal_tls.generate(tmp_path / "certs", "a")
    (folder / "tls.key").unlink()
    monkeypatch.setenv(internal_tls.ENV, str(folder))
    with pytest.raises(ValueError, match="lacks tls.key"):
        endpoints.internal_channel("127.0.0.1:1")
    with pytest.raises(ValueError, match="lacks tls.key"):
        endpoints.listen(endpoints.server(1), "127.0.0.1:0")
    fresh = internal_tls.generate(tmp_path / "fresh", "a")
    assert (fresh / "tls.key").stat().st_mode & 0o077 == 0, "key not private"
    installed = internal_tls.install(internal_tls.pems(fresh))  # as a Ray actor on another machine gets them
    try:
        assert os.environ[internal_tls.ENV] == str(installed) and internal_tls.folder() == installed
        assert all((installed / f).read_bytes() == (fresh / f).read_bytes() for f in internal_tls.FILES)
        assert installed.stat().st_mode & 0o077 == 0 and (installed / "tls.key").stat().st_mode & 0o077 == 0
    finally:
        shutil.rmtree(installed)


def test_a_cluster_with_internal_tls_serves_and_scales_under_load_answering_as_transformers(
        local_clusters, qwen3, monkeypatch, tmp_path):
    c = local_clusters("mtls", qwen3, workers=2, replicas=1, internal_tls=True)
    status = c.status()  # over mutual TLS, from the cluster's folder
    folder = status["internal_tls"]
    assert folder and internal_tls.folder(folder)
    model = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    batch = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(batch).logits
    assert torch.allclose(Client(status["endpoint"]).forward(batch), expected, atol=1e-4)  # users: no certificate

    with ClosedLoopLoad(status["endpoint"], batch, expected, clients=2, max_seconds=120) as load:
        for line in c.scale(3):  # new worker, experts copied peer to peer, over mTLS and bulk tickets
            pass
        for line in c.scale(2):
            pass
    assert load.report.ok > 0 and load.report.failed == 0 and load.report.wrong == 0, load.report.errors[:3]
    status = c.status()
    assert sum(w["state"] == "serving" for w in status["workers"]) == 2

    for w in status["workers"]:
        assert refused(grpc.insecure_channel(w["address"])), f"worker {w['id']} answered plaintext"
        assert stats(endpoints.internal_channel(w["address"], tls_folder=folder)).worker_id == w["id"]
    assert refused(grpc.insecure_channel(status["controller"]), lambda ch: controller_pb2_grpc.ControllerStub(
        ch).Status(controller_pb2.StatusRequest(), timeout=5)), "the controller answered plaintext"

    # A trainer: `moectl train` hands it the cluster's certificates (its update goes to every worker)
    run = subprocess.run([sys.executable, "-m", "moecluster.cli.moectl", "train", "--name", "mtls", "--steps", "2",
                          "--batch", "2", "--seq", "8", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert c.status()["step"] == 2

    monkeypatch.setenv(internal_tls.ENV, folder)  # an SDK admin call, as `moectl status` tells its user
    Client(status["endpoint"]).scale(3)
    assert sum(w["state"] == "serving" for w in c.wait_converged(120, lambda _: None)["workers"]) == 3


def test_a_plaintext_cluster_ignores_certificates_in_the_shell_that_started_it(local_clusters, qwen3, tmp_path, monkeypatch):
    """MOECLUSTER_INTERNAL_TLS in the caller's environment is for its own calls: a cluster made without
    `internal_tls` stays plaintext in every part (its controller drops the variable for itself and its children)."""
    monkeypatch.setenv(internal_tls.ENV, str(internal_tls.generate(tmp_path / "elsewhere", "x")))
    c = local_clusters("plain", qwen3, workers=1, replicas=1)
    status = c.status()
    assert status["internal_tls"] == ""
    assert stats(grpc.insecure_channel(status["workers"][0]["address"])).held
    assert Client(status["endpoint"]).forward(torch.tensor([[1, 2, 3]])).shape[:2] == (1, 3)
