"""The frontend's methods over plain HTTP, for frontends behind an HTTP ingress (Ray Serve).

POST BASE/METHOD with the serialized request; the body of a 200 is the
serialized response, any other status a text reason. `HttpFrontendStub` looks
like the gRPC stub to `Client` (same methods, same messages, errors as
`grpc.RpcError`-like exceptions with a status code), so the SDK is one client
over either transport.

GenerateStream's 200 body is a stream of frames, each one byte of kind, four of
length (big-endian) and that many bytes: a serialized GenerateChunk (kind 0), or
"CODE: reason" for a failure after the first tokens (kind 1, the last frame). A
failure before them is a plain status, as for the other methods. Closing the
response stops the generation.
"""

from __future__ import annotations

import struct
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
        with self._open(request, timeout) as answer:
            return self.response_type.FromString(answer.read())

    def _open(self, request, timeout: float | None):
        http = urllib.request.Request(self.url, data=request.SerializeToString(), method="POST",
                                      headers={"Content-Type": "application/x-protobuf"})
        try:
            return urllib.request.urlopen(http, timeout=timeout)
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            code = _CODES.get(err.code, grpc.StatusCode.INTERNAL)
            raise HttpCallError(code, text.split(": ", 1)[-1] if ": " in text else text) from None
        except (urllib.error.URLError, OSError) as err:
            raise HttpCallError(grpc.StatusCode.UNAVAILABLE, f"failed to connect to {self.url}: {err}") from None


class _StreamMethod(_Method):
    def __call__(self, request, timeout: float | None = None) -> _Frames:
        return _Frames(self._open(request, timeout))


CHUNK, FAILURE = 0, 1  # a GenerateStream frame's kinds
_HEADER = struct.Struct(">BI")


def frame(kind: int, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


class _Frames:
    """GenerateStream's answer read frame by frame: iterates GenerateChunks, raises a failure frame as
    HttpCallError; `cancel()` closes the response (the frontend then stops the generation)."""

    def __init__(self, answer):
        self._answer = answer

    def __iter__(self):
        return self

    def __next__(self) -> frontend_pb2.GenerateChunk:
        header = self._read(_HEADER.size, may_end=True)
        if not header:
            self.cancel()
            raise StopIteration
        kind, size = _HEADER.unpack(header)
        payload = self._read(size)
        if kind == FAILURE:
            self.cancel()
            code, _, details = payload.decode(errors="replace").partition(": ")
            raise HttpCallError(getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL), details)
        return frontend_pb2.GenerateChunk.FromString(payload)

    def _read(self, size: int, may_end: bool = False) -> bytes:
        """`size` bytes, or none where the stream `may_end` (between frames); HttpCallError when it breaks off."""
        data = b""
        while len(data) < size:
            try:
                more = self._answer.read(size - len(data))
            except OSError as err:
                raise HttpCallError(grpc.StatusCode.UNAVAILABLE, f"the stream broke: {err}") from None
            if not more:
                if data or not may_end:
                    raise HttpCallError(grpc.StatusCode.UNAVAILABLE, "the stream broke off mid-frame")
                break
            data += more
        return data

    def cancel(self) -> None:
        self._answer.close()


class HttpFrontendStub:
    def __init__(self, base_url: str):
        base = base_url.rstrip("/")
        for name, response_type in _RESPONSES.items():
            setattr(self, name, _Method(f"{base}/{name}", response_type))
        self.GenerateStream = _StreamMethod(f"{base}/GenerateStream", frontend_pb2.GenerateChunk)
