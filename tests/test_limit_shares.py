"""API-key holders' limits hold across a cluster's frontends (controller/limit_shares.py): each frontend applies
its part of a holder's requests-per-second and tokens-per-minute, its part of where the holder's calls arrive.

Before, every frontend applied the whole limits: behind N frontends a holder got N times them. Dividing by N
instead would starve a client whose connection stays on one frontend (gRPC keeps one): the parts follow
the calls. The last test runs two real frontend processes on one real cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from moecluster.controller.limit_shares import EXPIRE_S, ShareBook
from moecluster.observability.prometheus import parse
from moecluster.protos import frontend_pb2, frontend_pb2_grpc
from moecluster.wire import access
from moecluster.wire.rate_limits import LimitShares, RateLimits

WAIT_S = 120.0


def test_one_frontend_holds_all_of_every_limit():
    book = ShareBook(clock=lambda: 0.0)
    assert book.report("a", {"team-a": 40}) == ({"team-a": 1.0}, 1.0)
    assert book.report("a", {}) == ({"team-a": 1.0}, 1.0)


def test_parts_follow_the_calls_sum_to_one_and_forget_a_frontend_gone_quiet():
    now = [0.0]
    book = ShareBook(clock=lambda: now[0])
    book.report("a", {"team-a": 40})
    parts_b, others_b = book.report("b", {})  # b saw none of team-a's calls: a sliver, so one gets through now and then
    parts_a, _ = book.report("a", {"team-a": 40})
    assert others_b == 0.5 and parts_b["team-a"] < 0.1 < 0.9 < parts_a["team-a"]
    assert parts_a["team-a"] + book.report("b", {})[0]["team-a"] == pytest.approx(1.0)

    for _ in range(6):  # team-a's connection moved to b: within seconds the parts follow
        parts_a, _ = book.report("a", {})
        parts_b, _ = book.report("b", {"team-a": 40})
    assert parts_a["team-a"] < 0.1 < 0.9 < parts_b["team-a"]

    for _ in range(6):  # both busy alike: halves
        parts_a, _ = book.report("a", {"team-a": 20})
        parts_b, _ = book.report("b", {"team-a": 20})
    assert parts_a["team-a"] == pytest.approx(0.5, abs=0.03) and parts_b["team-a"] == pytest.approx(0.5, abs=0.03)

    now[0] += EXPIRE_S + 1  # a stopped: b alone holds all of it
    assert book.report("b", {"team-a": 20}) == ({"team-a": 1.0}, 1.0)
    assert book.frontends() == 1


def test_a_guard_holds_a_holder_to_its_part_of_the_rate(tmp_path):
    (tmp_path / "keys").write_text("k1 name=team-a requests-per-second=10\n")
    now = [0.0]
    shares = LimitShares()
    guard = access.RequireApiKey(access.ApiKeys(tmp_path / "keys"), limits=RateLimits(clock=lambda: now[0]),
                                 shares=shares)
    details = type("Details", (), {"method": "/moecluster.frontend.v1.Frontend/Info",
                                   "invocation_metadata": (("authorization", "Bearer k1"),)})()
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None)

    def admitted_in(seconds: float, calls_per_second: int = 100) -> int:
        admitted = 0
        for _ in range(int(seconds * calls_per_second)):
            now[0] += 1.0 / calls_per_second
            admitted += guard.intercept_service(lambda d: handler, details) is handler
        return admitted

    assert 18 <= admitted_in(2.0) <= 31  # the whole rate: a 10-call burst, then 10 a second
    assert shares.take_asked() == {"team-a": 200}
    shares.update({"team-a": 0.25}, 0.5)
    admitted_in(1.0)  # the bucket drains to the new part
    assert 4 <= admitted_in(2.0) <= 6, "a quarter of 10 calls/s"
    shares.update({}, 0.5)  # team-a seen nowhere lately: the others' part
    assert 9 <= admitted_in(2.0) <= 11
    shares.alone()
    admitted_in(1.0)
    assert 18 <= admitted_in(2.0) <= 21
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        shares.update({"team-a": 0.0}, 0.5)


def _second_frontend(c, tmp_path, keys) -> tuple[subprocess.Popen, str, str]:
    """Another frontend process on the cluster's controller, with the same keys: (process, address, metrics)."""
    ready = tmp_path / "second.ready"
    proc = subprocess.Popen([sys.executable, "-m", "moecluster.frontend.server", "--checkpoint", c.spec().model,
                             "--controller", c.status()["controller"], "--api-keys", str(keys), "--frontend-id", "second",
                             "--ready-file", str(ready)], stdout=open(tmp_path / "second.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WAIT_S
    while not ready.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "second.log").read_text()
        time.sleep(0.1)
    info = json.loads(ready.read_text())
    return proc, info["address"], info["metrics"]


def _hammer(address: str, seconds: float, counts: dict, name: str) -> None:
    """Info calls as team-a as fast as one client goes, for `seconds`: counts[name] = [admitted, refused]."""
    counts[name] = [0, 0]
    with grpc.insecure_channel(address) as channel:
        stub = frontend_pb2_grpc.FrontendStub(channel)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                stub.Info(frontend_pb2.InfoRequest(), timeout=10, metadata=(("authorization", "Bearer k1"),))
                counts[name][0] += 1
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                counts[name][1] += 1


def _part(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
        found = [v for n, labels, v in parse(reply.read().decode())
                 if n == "moecluster_frontend_client_limit_part" and labels.get("client") == "team-a"]
    return found[0] if found else 1.0


def test_two_frontends_hold_a_holder_to_its_rate_together_and_one_alone_to_all_of_it(local_clusters, qwen3, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1 name=team-a requests-per-second=10\n")
    c = local_clusters("shared", qwen3, workers=1, replicas=1, api_keys=keys)
    first = c.status()["endpoint"]
    proc, second, second_metrics = _second_frontend(c, tmp_path, keys)
    try:
        counts: dict = {}
        _hammer(first, 3.0, counts, "warm")  # the parts settle: team-a's calls arrive at the first frontend only
        _hammer(first, 4.0, counts, "first alone")
        # Its connection on one frontend, a holder gets all of its rate there, not half: 10/s, a burst of 10
        assert 30 <= counts["first alone"][0] <= 55, counts
        assert _part(second_metrics) < 0.2, "the idle frontend should hold a sliver of team-a's rate"

        threads = [threading.Thread(target=_hammer, args=(address, 8.0, counts, name))
                   for name, address in (("first", first), ("second", second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = counts["first"][0] + counts["second"][0]
        # Both frontends, 8 s: about 80 together (the parts shift within a few seconds), never the 160 of two
        # frontends each applying the whole rate
        assert 55 <= together <= 115, counts
        assert counts["second"][0] >= 12, f"the second frontend's part did not grow with its calls: {counts}"
        assert 0.2 <= _part(second_metrics) <= 0.8
    finally:
        proc.terminate()
        proc.wait(timeout=30)
