"""The error a worker's RPC handler raises to answer with a gRPC status: no torch here, so the
controller can share the modules that raise it (snapshot folders) without loading torch."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)
