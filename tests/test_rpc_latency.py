"""Latency histograms: the text format of a histogram, and the interceptor timing a real gRPC server's RPCs."""

from __future__ import annotations

import math
import threading

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from moecluster.observability.prometheus import Histogram, Registry, parse
from moecluster.observability.rpc_latency import RpcLatency
from moecluster.wire import endpoints

TIMEOUT_S = 10.0


def series(text: str) -> dict[tuple[str, frozenset], float]:
    return {(name, frozenset(labels.items())): value for name, labels, value in parse(text)}


def test_a_histogram_renders_cumulative_buckets_sum_and_count():
    latency = Histogram("demo_seconds", "how long", ["method"], buckets=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):  # a bound holds what equals it
        latency.observe(seconds, method="Forward")
    latency.observe(0.2, method="Info")
    r = Registry()
    assert r.add(latency) is latency and r.add(latency) is latency  # a registry per scrape takes the long-lived one
    text = r.render()
    assert "# HELP demo_seconds how long\n# TYPE demo_seconds histogram\n" in text
    got = series(text)
    forward = lambda name, **more: got[(name, frozenset({"method": "Forward", **more}.items()))]  # noqa: E731
    assert [forward("demo_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]
    assert forward("demo_seconds_sum") == pytest.approx(3.65) and forward("demo_seconds_count") == 4
    assert got[("demo_seconds_bucket", frozenset({"method": "Info", "le": "0.1"}.items()))] == 0
    assert latency.count(method="Info") == 1 and latency.count(method="Generate") == 0
    with pytest.raises(ValueError, match="takes labels"):
        latency.observe(1.0)
    for bad in ((), (1.0, 0.5), (0.5, 0.5), (1.0, math.inf)):
        with pytest.raises(ValueError, match="increasing"):
            Histogram("demo_seconds", buckets=bad)
    with pytest.raises(ValueError, match="bad or repeated label"):
        Histogram("demo_seconds", labels=["le"])  # the bucket bound's own label


def test_threads_observing_at_once_lose_no_observation():
    latency = Histogram("demo_seconds", labels=["method"], buckets=(0.5,))
    start = threading.Barrier(8)

    def observe(i):
        start.wait()
        for n in range(5000):
            latency.observe(n % 2, method="Forward" if i % 2 else "Info")  # 0 and 1: half under the bound

    threads = [threading.Thread(target=observe, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    got_meanwhile = latency.count(method="Forward")  # a read while they count: no error, some total
    for t in threads:
        t.join()
    assert 0 <= got_meanwhile <= 20000
    r = Registry()
    r.add(latency)
    got = series(r.render())
    forward = lambda name, **more: got[(name, frozenset({"method": "Forward", **more}.items()))]  # noqa: E731
    assert (forward("demo_seconds_bucket", le="0.5"), forward("demo_seconds_count"), forward("demo_seconds_sum")) == (
        10000, 20000, 10000)
    assert latency.count(method="Info") == 20000


class Server:
    """A real gRPC server on loopback with one method of each kind (bytes in, bytes out), timed."""

    def __init__(self):
        self.latency = RpcLatency("demo_rpc_seconds")
        self.streaming = threading.Event()

        def unary(request, context):
            if request == b"abort":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not here")
            if request == b"raise":
                raise RuntimeError("a bug of the handler's own")
            return request

        def upload(requests, context):
            return b"".join(requests)

        def download(request, context):
            for _ in range(1000):
                self.streaming.set()
                yield request

        def echo(requests, context):
            yield from requests

        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Upload": grpc.stream_unary_rpc_method_handler(upload),
                    "Download": grpc.unary_stream_rpc_method_handler(download),
                    "Echo": grpc.stream_stream_rpc_method_handler(echo)}
        self.server = endpoints.server(4, handlers=[grpc.method_handlers_generic_handler("demo.Demo", handlers)],
                                       interceptors=[self.latency])
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def count(self, method: str, code: str) -> int:
        return self.latency.histogram.count(method=method, code=code)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.server.stop(0).wait()


def test_every_kind_of_rpc_is_timed_with_the_code_it_ended_with(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        unary = channel.unary_unary("/demo.Demo/Unary")
        assert unary(b"hi", timeout=TIMEOUT_S) == b"hi"
        for request, code in ((b"abort", grpc.StatusCode.FAILED_PRECONDITION), (b"raise", grpc.StatusCode.UNKNOWN)):
            with pytest.raises(grpc.RpcError) as err:
                unary(request, timeout=TIMEOUT_S)
            assert err.value.code() == code
        assert channel.stream_unary("/demo.Demo/Upload")(iter([b"a", b"b"]), timeout=TIMEOUT_S) == b"ab"
        assert list(channel.stream_stream("/demo.Demo/Echo")(iter([b"a", b"b"]), timeout=TIMEOUT_S)) == [b"a", b"b"]
        stream = channel.unary_stream("/demo.Demo/Download")(b"x", timeout=TIMEOUT_S)
        assert next(stream) == b"x"
        stream.cancel()  # the client goes away mid-stream
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    server.server.stop(5).wait()  # every handler has returned: the cancelled stream's is recorded
    assert [server.count("Unary", code) for code in ("OK", "FAILED_PRECONDITION", "UNKNOWN")] == [1, 1, 1]
    assert (server.count("Upload", "OK"), server.count("Echo", "OK"), server.count("Download", "CANCELLED")) == (1, 1, 1)
    registry = Registry()
    registry.add(server.latency.histogram)
    text = registry.render()
    assert "Check" not in text, "health checks are not timed"
    assert sum(v for (name, _), v in series(text).items() if name == "demo_rpc_seconds_count") == 6
