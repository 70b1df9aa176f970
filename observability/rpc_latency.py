"""How long a server's RPCs take, by method and outcome: a gRPC server interceptor feeding a histogram.

    latency = RpcLatency("moecluster_worker_rpc_seconds")
    server = endpoints.server(64, interceptors=[latency])   # every RPC it serves is timed
    registry.add(latency.histogram)                         # on /metrics, with the process's other metrics

A call is timed from when its handler starts to when it returns (a streamed answer: to its
last message, or to where it stopped), so a request that queued in the handler (a worker's
batcher) counts its wait. The outcome is the status code the handler ended with: OK, or the
code it aborted with, UNKNOWN for an exception of its own. gRPC's health service is not timed:
its Watch streams last as long as their watcher.
"""

from __future__ import annotations

import time

import grpc
from moecluster.observability.prometheus import Histogram

UNTIMED_SERVICES = ("grpc.health.v1.Health",)


class RpcLatency(grpc.ServerInterceptor):
    def __init__(self, name: str):
        self.histogram = Histogram(name, "RPCs answered, by method and status code, and how long each took (seconds)",
                                   ["method", "code"])
        self._timed: dict = {}  # a server's handler -> the same, timed: made once, not per call (bench/rpc_timing.py)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        timed = self._timed.get(handler)
        if timed is None:
            service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
            timed = self._timed[handler] = handler if service in UNTIMED_SERVICES else self._timing(method, handler)
        return timed

    def _timing(self, method: str, handler) -> grpc.RpcMethodHandler:
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(method, handler.stream_unary),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streamed(method, handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(self._streamed(method, handler.stream_stream),
                                                     handler.request_deserializer, handler.response_serializer)

    def _record(self, method: str, context, started: float, otherwise: grpc.StatusCode) -> None:
        """`otherwise`: the outcome where the handler set no code of its own."""
        code = context.code() or otherwise
        self.histogram.observe(time.perf_counter() - started, method=method, code=code.name)

    def _unary(self, method: str, behavior):
        def timed(request, context):
            started, outcome = time.perf_counter(), grpc.StatusCode.UNKNOWN
            try:
                response = behavior(request, context)
                outcome = grpc.StatusCode.OK
                return response
            finally:
                self._record(method, context, started, outcome)

        return timed

    def _streamed(self, method: str, behavior):
        def timed(request, context):
            started, outcome = time.perf_counter(), grpc.StatusCode.UNKNOWN
            try:
                yield from behavior(request, context)
                outcome = grpc.StatusCode.OK
            except GeneratorExit:  # the client went away mid-stream
                outcome = grpc.StatusCode.CANCELLED
                raise
            finally:
                self._record(method, context, started, outcome)

        return timed
