"""The frontend's methods over plain HTTP, for frontends behind an HTTP ingress (Ray Serve).

POST BASE/METHOD with the serialized request; the body of a 200 is the
serialized response, any other status a text reason. `HttpFrontendStub` looks
like the gRPC stub to `Client` (same methods, same messages, errors as
`grpc.RpcError`-like exceptions with a status code), so the SDK is one client
over either transport.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
from moecluster.protos import frontend_pb2

_RESPONSES = {"Forward": frontend_pb2.ForwardResponse, "Generate": frontend_pb2.GenerateResponse,
              "Info": frontend_pb2.InfoResponse, "Status": frontend_pb2.StatusResponse}
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE}


class HttpCallError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Method:
    def __init__(self, url: str, response_type):
        self.url, self.response_type = url, response_type

    def __call__(self, request, timeout: float | None = None):
        http = urllib.request.Request(self.url, data=request.SerializeToString(), method="POST",
                                      headers={"Content-Type": "application/x-protobuf"})
        try:
            with urllib.request.urlopen(http, timeout=timeout) as answer:
                return self.response_type.FromString(answer.read())
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            code = _CODES.get(err.code, grpc.StatusCode.INTERNAL)
            raise HttpCallError(code, text.split(": ", 1)[-1] if ": " in text else text) from None
        except (urllib.error.URLError, OSError) as err:
            raise HttpCallError(grpc.StatusCode.UNAVAILABLE, f"failed to connect to {self.url}: {err}") from None


class HttpFrontendStub:
    def __init__(self, base_url: str):
        base = base_url.rstrip("/")
        for name, response_type in _RESPONSES.items():
            setattr(self, name, _Method(f"{base}/{name}", response_type))
