"""Messages above ~1 MiB travel as a stream of Chunks of their serialization.

Small messages go unary (one round trip, no stream set-up); large ones are
split, so no single gRPC message grows with the payload. The last chunk
carries a CRC-32 of the whole payload, checked on arrival.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from moecluster.protos import tensor_pb2
from moecluster.wire.wire_error import WireError

CHUNK_BYTES = 1 << 20  # payloads above this are streamed
MAX_MESSAGE_BYTES = 8 << 20  # gRPC limit; a chunk plus headers stays far below it
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def needs_streaming(payload_bytes: int) -> bool:
    return payload_bytes > CHUNK_BYTES


def split(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tensor_pb2.Chunk]:
    """bytes -> Chunks of at most `chunk_bytes`; always at least one chunk."""
    return split_reader(io.BytesIO(payload), len(payload), chunk_bytes)


def split_reader(reader: BinaryIO, total: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tensor_pb2.Chunk]:
    """The next `total` bytes of `reader` (a file) -> Chunks, read as they are sent (never all in memory)."""
    crc = 0
    sent = 0
    while True:
        data = reader.read(min(chunk_bytes, total - sent))
        if sent < total and not data:
            raise WireError(f"the source ended after {sent} of {total} bytes")
        chunk = tensor_pb2.Chunk(data=data)
        if sent == 0:
            chunk.total_size = total
        sent += len(data)
        crc = zlib.crc32(data, crc)
        if sent >= total:
            chunk.last = True
            chunk.crc32 = crc
            yield chunk
            return
        yield chunk


def join(chunks: Iterable[tensor_pb2.Chunk], *, limit_bytes: int) -> bytes:
    """Chunks -> the payload, checked against the announced size, `limit_bytes` and the CRC."""
    out = io.BytesIO()
    join_into(chunks, out, limit_bytes=limit_bytes)
    return out.getvalue()


def join_into(chunks: Iterable[tensor_pb2.Chunk], out: BinaryIO, *, limit_bytes: int) -> int:
    """Writes the payload of `chunks` to `out` as they arrive (a file: never all in memory), checked as
    `join` checks it; returns its size. On a WireError, `out` holds a part: the caller discards it."""
    received = 0
    announced = None
    crc = 0
    for chunk in chunks:
        if announced is None:
            announced = chunk.total_size
            if announced > limit_bytes:
                raise WireError(f"payload of {announced} bytes is over the limit of {limit_bytes} bytes")
        received += len(chunk.data)
        if received > announced:
            raise WireError(f"received {received} bytes, more than the {announced} announced")
        out.write(chunk.data)
        crc = zlib.crc32(chunk.data, crc)
        if chunk.last:
            if received != announced:
                raise WireError(f"received {received} bytes, {announced} announced")
            if crc != chunk.crc32:
                raise WireError("checksum mismatch: the payload was corrupted in transit")
            return received
    raise WireError("stream ended before its last chunk")
