"""API keys and TLS on a real gRPC server: who is let in, what a refusal says, and rotating both without a restart."""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from moecluster.observability.prometheus import frontend_metrics, parse
from moecluster.observability.rpc_latency import RpcLatency
from moecluster.wire import access, endpoints
from moecluster.wire.rate_limits import RateLimits, TokenBudgets
from tls_files import make_ca

TIMEOUT_S = 10.0
ECHO = "/test.Echo/"


def echo_handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "Stream": grpc.stream_stream_rpc_method_handler(lambda requests, context: (r for r in requests)),
    })


class Server:
    """A real server with the frontend's interceptors: timed, then guarded."""

    def __init__(self, keys: access.ApiKeys | None = None, tls: tuple | None = None):
        self.latency = RpcLatency("test_rpc_seconds")
        self.guard = access.RequireApiKey(keys) if keys else None
        guard = [self.guard] if keys else []
        self.server = endpoints.server(4, handlers=[echo_handlers()], interceptors=[self.latency, *guard])
        checks = health.HealthServicer()
        checks.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, self.server)
        port = access.add_port(self.server, "127.0.0.1:0", tls)
        # A second address on the same port, as a frontend pod listens (its IP, and 127.0.0.1 for port-forward).
        assert access.add_port(self.server, f"127.0.0.2:{port}", tls) == port
        self.address, self.second = f"127.0.0.1:{port}", f"127.0.0.2:{port}"
        self.server.start()

    def stop(self):
        self.server.stop(0)


def call(channel, method: str, payload: bytes = b"hi", key: str | None = None) -> bytes:
    metadata = [("authorization", f"Bearer {key}")] if key is not None else None
    if method == "Unary":
        return channel.unary_unary(ECHO + "Unary")(payload, timeout=TIMEOUT_S, metadata=metadata)
    return b"".join(channel.stream_stream(ECHO + "Stream")(iter([payload, payload]), timeout=TIMEOUT_S, metadata=metadata))


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "api-keys"
    path.write_text("# rotated monthly\nkey-one\n\n  key-two  \n")
    return path


def test_only_a_listed_key_gets_in_and_a_refusal_says_what_to_send(keys_file):
    server = Server(access.ApiKeys(keys_file))
    try:
        with grpc.insecure_channel(server.address) as channel:
            for method in ("Unary", "Stream"):
                assert call(channel, method, key="key-one") in (b"hi", b"hihi")
                assert call(channel, method, key="key-two") in (b"hi", b"hihi")  # spaces around a key are not part of it
                with pytest.raises(grpc.RpcError) as missing:
                    call(channel, method)
                assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "api_key=KEY" in missing.value.details() and "MOECLUSTER_API_KEY" in missing.value.details()
                for wrong in ("key-three", "key-on", "# rotated monthly"):
                    with pytest.raises(grpc.RpcError) as refused:
                        call(channel, method, key=wrong)
                    assert (refused.value.code(), refused.value.details()) == (
                        grpc.StatusCode.UNAUTHENTICATED, "the API key was not accepted")
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING  # probes and load balancers send no key
        count = server.latency.histogram.count
        assert count(method="Unary", code="OK") == 2 and count(method="Unary", code="UNAUTHENTICATED") == 4
        assert count(method="Stream", code="UNAUTHENTICATED") == 4  # refusals are on /metrics too
    finally:
        server.stop()


def test_a_rotated_keys_file_takes_effect_and_a_broken_one_keeps_the_last_good_keys(keys_file, monkeypatch):
    monkeypatch.setattr(access, "RECHECK_S", 0.0)
    keys = access.ApiKeys(keys_file)
    assert keys.accepts("key-one") and not keys.accepts("key-new")
    keys_file.write_text("key-new\n")
    assert keys.accepts("key-new") and not keys.accepts("key-one")
    keys_file.write_text("# emptied half-way through a rotation\n")
    assert keys.accepts("key-new")
    keys_file.unlink()
    assert keys.accepts("key-new")
    # A Secret volume's update: the file is a symlink into a new folder, swapped at once.
    target = keys_file.parent / "..data-2" / "api-keys"
    target.parent.mkdir()
    target.write_text("key-from-the-secret\n")
    keys_file.symlink_to(target)
    assert keys.accepts("key-from-the-secret") and not keys.accepts("key-new")


def test_a_keys_file_that_cannot_serve_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="cannot read the API keys file .*missing"):
        access.ApiKeys(tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        access.ApiKeys(tmp_path / "empty")


def test_tls_serves_the_clients_that_trust_its_ca_and_a_renewed_certificate_at_the_next_handshake(tmp_path):
    ca = make_ca(tmp_path)
    cert, key = ca.issue(tmp_path, "frontend", ["localhost", "127.0.0.1"])
    server = Server(tls=(cert, key))
    try:
        for address in (server.address, server.second):
            with endpoints.channel(address, credentials=access.channel_credentials(ca.pem),
                                   options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
                assert call(channel, "Unary") == b"hi" and call(channel, "Stream") == b"hihi"
        with grpc.insecure_channel(server.address) as plaintext, pytest.raises(grpc.RpcError) as refused:
            call(plaintext, "Unary")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        other = make_ca(tmp_path, "another-ca")
        with endpoints.channel(server.address, credentials=access.channel_credentials(other.pem)) as untrusting:
            with pytest.raises(grpc.RpcError) as refused:
                call(untrusting, "Unary")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        (tmp_path / "torn.crt").write_text("-----BEGIN CERTIF")  # a renewal cut short: the last good one serves on
        os.replace(tmp_path / "torn.crt", cert)
        with endpoints.channel(server.address, credentials=access.channel_credentials(ca.pem)) as channel:
            assert call(channel, "Unary") == b"hi"
        # cert-manager renews the certificate in place, from the other CA: a new connection gets the new one.
        renewed_cert, renewed_key = other.issue(tmp_path, "renewed", ["localhost", "127.0.0.1"])
        os.replace(renewed_key, key)
        os.replace(renewed_cert, cert)
        with endpoints.channel(server.address, credentials=access.channel_credentials(other.pem.read_bytes())) as channel:
            assert call(channel, "Unary") == b"hi"
        with endpoints.channel(server.address, credentials=access.channel_credentials(ca.pem)) as stale:
            with pytest.raises(grpc.RpcError):
                call(stale, "Unary")
    finally:
        server.stop()


def test_bad_tls_files_are_refused_with_their_name(tmp_path):
    ca = make_ca(tmp_path)
    cert, key = ca.issue(tmp_path, "frontend", ["localhost"])
    with pytest.raises(ValueError, match="cannot read the TLS certificate or key .*nowhere.key"):
        access.server_credentials(cert, tmp_path / "nowhere.key")
    with pytest.raises(ValueError, match="frontend.crt is not a PEM private key"):
        access.server_credentials(cert, cert)
    with pytest.raises(ValueError, match="cannot read the CA bundle"):
        access.channel_credentials(tmp_path / "no-ca.pem")


def test_a_keys_line_names_its_holder_and_may_limit_their_rate():
    keys = access.parse_keys("# team keys\nkey-a name=team-a requests-per-second=2.5\n"
                             "key-b   name=batch.jobs_2  # no limit\nkey#c\nkey-d tokens-per-minute=1e5 name=d\n")
    assert keys == {b"key-a": access.Caller("team-a", 2.5), b"key-b": access.Caller("batch.jobs_2"),
                    b"key#c": access.Caller("key-" + hashlib.sha256(b"key#c").hexdigest()[:8]),
                    b"key-d": access.Caller("d", None, 100000.0)}
    for text, line in [("ok\nkey-a name=\n", 2), ("key-a name=two words\n", 1), ("key-a name=Ω\n", 1),
                       ("key-a tokens-per-minute=0\n", 1), ("key-a tokens-per-minute=-5\n", 1),
                       ("x\n\nkey-a requests-per-second=0\n", 3), ("key-a requests-per-second=inf\n", 1),
                       ("key-a requests-per-second=fast\n", 1), ("key-a color=red\n", 1), ("key-a\nkey-a\n", 2),
                       ("name=team-a key-a\n", 1)]:
        with pytest.raises(ValueError, match=f"^line {line}: "):
            access.parse_keys(text)


def test_rate_limits_let_a_burst_through_then_the_rate():
    now = [100.0]
    limits = RateLimits(clock=lambda: now[0])
    assert [limits.take("a", 3.0) for _ in range(4)] == [True, True, True, False]  # a second's worth at once
    assert limits.take("b", 3.0)  # each name its own bucket
    now[0] += 0.34
    assert [limits.take("a", 3.0) for _ in range(2)] == [True, False]
    now[0] += 10.0  # idle: the bucket holds a second's worth, not ten
    assert [limits.take("a", 3.0) for _ in range(4)] == [True, True, True, False]
    assert [limits.take("slow", 0.5) for _ in range(2)] == [True, False]  # under 1/s: bursts of one
    now[0] += 1.9
    assert not limits.take("slow", 0.5)
    now[0] += 0.2
    assert limits.take("slow", 0.5)
    with pytest.raises(ValueError, match="lets nothing through"):
        limits.take("a", 0.0)


def test_token_budgets_let_a_minute_through_and_charge_after_the_fact():
    now = [50.0]
    budgets = TokenBudgets(clock=lambda: now[0])
    assert budgets.wait("a", 600.0) == 0.0  # a minute's worth to start with
    budgets.charge("a", 500, 600.0)
    assert budgets.wait("a", 600.0) == 0.0  # 100 left: let in, however large its call
    budgets.charge("a", 400, 600.0)
    assert budgets.wait("a", 600.0) == pytest.approx(30.0)  # 300 below zero at 10 tokens/s
    assert budgets.wait("b", 600.0) == 0.0  # each name its own budget
    now[0] += 30.0
    assert budgets.wait("a", 600.0) == pytest.approx(1e-3)  # exactly at zero: nothing left yet
    now[0] += 0.2
    assert budgets.wait("a", 600.0) == 0.0
    now[0] += 3600.0  # idle: the budget holds a minute's worth, not an hour's
    budgets.charge("a", 600, 600.0)
    assert budgets.wait("a", 600.0) > 0
    with pytest.raises(ValueError, match="lets nothing through"):
        budgets.wait("a", 0.0)


def test_tokens_are_charged_to_their_holder_and_a_spent_budget_refused(tmp_path):
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("key-a name=team-a tokens-per-minute=12\nkey-b name=team-b\n")  # team-a: 0.2 tokens/s
    now = [0.0]
    guard = access.RequireApiKey(access.ApiKeys(keys_file), budgets=TokenBudgets(clock=lambda: now[0]))

    def computed(request, context):  # as the frontend does: a call's tokens, charged once it is answered
        guard.charge(context.invocation_metadata(), len(request))
        return request

    charging = grpc.method_handlers_generic_handler("test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(computed)})
    server = endpoints.server(4, handlers=[charging], interceptors=[guard])
    port = access.add_port(server, "127.0.0.1:0", None)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert call(channel, "Unary", b"x" * 10, key="key-a") == b"x" * 10  # 2 left
            assert call(channel, "Unary", b"y" * 8, key="key-a") == b"y" * 8  # let in: 6 below zero after it
            with pytest.raises(grpc.RpcError) as spent:
                call(channel, "Unary", b"z", key="key-a")
            assert (spent.value.code(), spent.value.details()) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED, "team-a has used its 12 tokens/min: retry in 30 s")
            for _ in range(3):
                assert call(channel, "Unary", b"w" * 100, key="key-b")  # no budget: counted, never refused
            now[0] += 30.5
            assert call(channel, "Unary", b"z", key="key-a") == b"z"
        assert guard.tokens() == {"team-a": 19, "team-b": 300}
        assert guard.calls() == {("team-a", "admitted"): 3, ("team-a", "limited"): 1, ("team-b", "admitted"): 3}
        text = frontend_metrics(requests=0, failed=0, retries=0, wire_bytes=0, epoch=0, outstanding={},
                                client_calls=guard.calls(), client_tokens=guard.tokens())
        assert {labels["client"]: v for name, labels, v in parse(text)
                if name == "moecluster_frontend_client_tokens_total"} == {"team-a": 19, "team-b": 300}
    finally:
        server.stop(0)


def test_calls_are_counted_by_holder_and_those_over_its_rate_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(access, "RECHECK_S", 0.0)
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("key-a name=team-a requests-per-second=0.001\nkey-b name=team-b\n")  # team-a: 1, then none
    keys = access.ApiKeys(keys_file)
    server = Server(keys)
    try:
        with grpc.insecure_channel(server.address) as channel:
            assert call(channel, "Unary", key="key-a") == b"hi"
            for method in ("Unary", "Stream"):
                with pytest.raises(grpc.RpcError) as limited:
                    call(channel, method, key="key-a")
                assert (limited.value.code(), limited.value.details()) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "team-a is over its 0.001 requests/s: slow down and retry")
            for _ in range(5):
                assert call(channel, "Unary", key="key-b") == b"hi"
            assert server.guard.calls() == {("team-a", "admitted"): 1, ("team-a", "limited"): 2,
                                            ("team-b", "admitted"): 5}
            keys_file.write_text("key-a name=team-a requests-per-second=1e6\nkey-b name=team-b\n")  # raised: refilled in 1 us
            assert call(channel, "Unary", key="key-a") == b"hi"
            keys_file.write_text("key-a name=team-a requests-per-second=-1\n")  # a bad edit: the last good keys stay
            assert call(channel, "Unary", key="key-b") == b"hi"
        assert server.latency.histogram.count(method="Unary", code="RESOURCE_EXHAUSTED") == 1
        text = frontend_metrics(requests=0, failed=0, retries=0, wire_bytes=0, epoch=0, outstanding={},
                                client_calls=server.guard.calls())
        calls = {(labels["client"], labels["outcome"]): value for name, labels, value in parse(text)
                 if name == "moecluster_frontend_client_calls_total"}
        assert calls == {("team-a", "admitted"): 2, ("team-a", "limited"): 2, ("team-b", "admitted"): 6}
    finally:
        server.stop()
