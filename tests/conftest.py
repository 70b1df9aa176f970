"""Shared fixtures: tiny checkpoints made on the fly, real worker servers on loopback."""

from __future__ import annotations

import os
import zlib

import grpc
import pytest
import torch
from shared import running_workers

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen
# before anything imports triton (transformers does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> path of a tiny checkpoint (2 MoE layers x 8 experts, top-2, hidden 64), made once per session."""
    from moecluster.models.tiny import create_checkpoint
    from transformers.utils import logging

    logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("checkpoints")

    class Lazy(dict):
        def __missing__(self, family):
            # Seeded by name, not by the order a session first asks: a test sees the same model alone as in the full run.
            self[family] = create_checkpoint(family, root / family, seed=zlib.crc32(family.encode()) % 1000)
            return self[family]

    return Lazy()


@pytest.fixture(scope="session")
def qwen3(checkpoints):
    return checkpoints["qwen3_moe"]


@pytest.fixture
def local_clusters(tmp_path, monkeypatch):
    """up(name, model path, workers, replicas, **LocalCluster.up kwargs) -> a running LocalCluster (real
    processes under a private MOECLUSTER_HOME), each brought down at the end of the test."""
    from moecluster.backends.local import ClusterError, LocalCluster

    monkeypatch.setenv("MOECLUSTER_HOME", str(tmp_path / "home"))
    made = []

    def up(name, path, workers, replicas, **kwargs):
        c = LocalCluster(name)
        kwargs.setdefault("timeout", 180)  # before pytest's 300 s: a stuck start fails with the controller's log
        c.up(path, workers=workers, replicas=replicas, port=0, **kwargs)
        made.append(c)
        return c

    yield up
    for c in made:
        try:
            c.down(grace=2)
        except ClusterError:
            pass


@pytest.fixture
def seeded():
    torch.manual_seed(0)


# -- one worker's RPC tests (test_worker_rpcs, test_worker_pull) -------------------------------

ALL_EXPERTS = {(layer, e): ("w",) for layer in (0, 1) for e in range(8)}


@pytest.fixture(scope="module")
def ckpt(qwen3):
    from moecluster.models.checkpoint import Checkpoint

    return Checkpoint(qwen3)


@pytest.fixture(scope="module")
def weights(ckpt):
    """layer -> (gate_up [E, 2I, H], down [E, H, I]) read with Checkpoint.read_expert."""
    g = ckpt.geometry
    assert (g.hidden, g.intermediate, g.num_experts, g.moe_layers) == (64, 32, 8, (0, 1))  # what the tests assume
    out = {}
    for layer in g.moe_layers:
        pairs = [ckpt.read_expert(layer, e) for e in range(g.num_experts)]
        out[layer] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
    return out


@pytest.fixture(scope="module")
def full_worker(qwen3):
    """One in-process worker holding every expert of both layers; yields its stub."""
    from moecluster.protos import worker_pb2_grpc
    from moecluster.wire import streaming

    with running_workers(qwen3, ALL_EXPERTS) as servers:
        with grpc.insecure_channel(servers["w"].address, options=streaming.GRPC_OPTIONS) as channel:
            yield worker_pb2_grpc.ExpertWorkerStub(channel)
