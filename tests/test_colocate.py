"""Affinity-aware placement on a live pool (`moectl up --colocate`): real processes, real routing reports.

A driver routes tokens to planted pairs of experts through its own dispatcher (whose table watcher
reports what it picks, as every frontend does), while a checked load runs through the cluster's
frontend. The controller must bring each pair onto one worker, which the driver sees as fewer
workers per token, with zero failed requests and zero wrong answers meanwhile.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from moecluster.controller.affinity import colocated_share
from moecluster.frontend.dispatcher import Dispatcher, ExpertUnavailableError
from moecluster.frontend.routing import RoutingTable
from moecluster.frontend.table_watcher import TableWatcher
from moecluster.protos import controller_pb2, controller_pb2_grpc
from moecluster.sdk.load import ClosedLoopLoad
from shared import wait_for
from transformers import AutoModelForCausalLM

TOKENS = 512  # per call: the planted pairs outweigh what the checked load's own routing picks together
PAUSE_S = 0.02  # between calls: on 2 cores a busier driver starves its own table watcher of acks


def placement(status) -> dict:
    out = {}
    for w in status["workers"]:
        if w["state"] == "serving":
            for layer, expert in w["experts"]:
                out[(layer, expert)] = out.get((layer, expert), ()) + (w["id"],)
    return out


def test_experts_picked_together_move_onto_one_worker_under_load(local_clusters, checkpoints):
    path = checkpoints["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(batch).logits
    c = local_clusters("colocate", path, 4, 1, colocate=True, capacity=4)  # no room for hot copies: swaps only
    gen = torch.Generator().manual_seed(3)
    perm = {layer: torch.randperm(8, generator=gen) for layer in (0, 1)}  # partners: perm[0]+perm[1], perm[2]+perm[3], ...
    planted = {tuple(sorted(((layer, int(perm[layer][2 * i])), (layer, int(perm[layer][2 * i + 1]))))): 1.0
               for layer in (0, 1) for i in range(4)}
    dispatcher = Dispatcher(RoutingTable(0, {}), timeout=30)
    watcher = TableWatcher(c.info()["controller"], dispatcher, "paired-driver")
    watcher.start()
    assert watcher.first_table.wait(30)

    def settled(status) -> bool:
        return status["converged"] and colocated_share(placement(status), planted) == 1.0

    def drive(seconds: float) -> float | None:
        """Routes pairs for `seconds`; the fan-out meanwhile (workers a token was sent to, on average), or None
        when a call raced a move. This driver is load, not a frontend: the zero-failure promise is the checked
        load's, through the cluster's frontend (as in test_elastic's Zipf test)."""
        tokens_in, tokens_sent, clean = dispatcher.tokens_in, dispatcher.tokens_sent, True
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for layer in (0, 1):
                pair = torch.randint(0, 4, (TOKENS,), generator=gen)
                index = torch.stack([perm[layer][2 * pair], perm[layer][2 * pair + 1]], dim=1)
                try:
                    dispatcher.forward(layer, torch.randn(TOKENS, 64, generator=gen), index,
                                       torch.full((TOKENS, 2), 0.5))
                except ExpertUnavailableError:
                    clean = False
            time.sleep(PAUSE_S)
        return (dispatcher.tokens_sent - tokens_sent) / (dispatcher.tokens_in - tokens_in) if clean else None

    def steady_fanout() -> float | None:
        """The fan-out over a 2 s window in which no call raced a move and the layout stood still."""
        for _ in range(5):
            epoch = c.status()["epoch"]
            window = drive(2.0)
            if window is not None and c.status()["epoch"] == epoch:
                return window
        return None

    try:
        with ClosedLoopLoad(c.status()["endpoint"], batch, expected, clients=1, max_seconds=300) as load:
            share_before = colocated_share(placement(c.status()), planted)
            fanout_before = steady_fanout()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not settled(c.status()):
                drive(1.0)
            assert wait_for(lambda: dispatcher.table.epoch == c.status()["epoch"], timeout=30)  # the driver routes by it
            fanout_after = steady_fanout()
            status = c.status()
    finally:
        watcher.stop()
        dispatcher.close()
    report = load.report
    assert report.ok > 0 and (report.failed, report.wrong) == (0, 0), report.errors[:3]
    assert share_before < 1.0, "the first layout already had every pair together: the test proves nothing"
    assert colocated_share(placement(status), planted) == 1.0, placement(status)
    assert None not in (fanout_before, fanout_after), "no 2 s window without a move, in 5 tries"
    assert fanout_after < 1.02 and fanout_before > 1.3, (fanout_before, fanout_after)  # 1.0: one worker a token
    assert status["colocate"] and status["colocated"] is not None and status["colocated"] > 0.5, status
    assert sorted(len(w["experts"]) for w in status["workers"]) == [4, 4, 4, 4]  # balance kept
    with grpc.insecure_channel(c.info()["controller"]) as channel:  # a bad report changes nothing
        stub = controller_pb2_grpc.ControllerStub(channel)
        for pairs, fragment in ((controller_pb2.ExpertPairs(layer=0, first=[1], second=[2, 3], tokens=[1.0]), "length"),
                                (controller_pb2.ExpertPairs(layer=7, first=[1], second=[2], tokens=[1.0]), "no such"),
                                (controller_pb2.ExpertPairs(layer=0, first=[1], second=[2], tokens=[-1.0]), ">= 0")):
            with pytest.raises(grpc.RpcError) as err:
                stub.ReportRouting(controller_pb2.RoutingReport(frontend_id="bad", seconds=1, layers=[pairs]), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
