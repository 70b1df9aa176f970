"""Messages above ~1 MiB travel as a stream of Chunks of their serialization.

Small messages go unary (one round trip, no stream set-up); large ones are
split, so no single gRPC message grows with the payload. The last chunk
carries a CRC-32 of the whole payload, checked on arrival.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

from moecluster.protos import tensor_pb2
from moecluster.wire.tensors import WireError

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
    view = memoryview(payload)
    total = len(payload)
    offsets = range(0, max(total, 1), chunk_bytes)
    last_offset = offsets[-1]
    for offset in offsets:
        chunk = tensor_pb2.Chunk(data=bytes(view[offset : offset + chunk_bytes]))
        if offset == 0:
            chunk.total_size = total
        if offset == last_offset:
            chunk.last = True
            chunk.crc32 = zlib.crc32(view)
        yield chunk


def join(chunks: Iterable[tensor_pb2.Chunk], *, limit_bytes: int) -> bytes:
    """Chunks -> the payload, checked against the announced size, `limit_bytes` and the CRC."""
    parts: list[bytes] = []
    received = 0
    announced = None
    for chunk in chunks:
        if announced is None:
            announced = chunk.total_size
            if announced > limit_bytes:
                raise WireError(f"payload of {announced} bytes is over the limit of {limit_bytes} bytes")
        received += len(chunk.data)
        if received > announced:
            raise WireError(f"received {received} bytes, more than the {announced} announced")
        parts.append(chunk.data)
        if chunk.last:
            payload = b"".join(parts)
            if received != announced:
                raise WireError(f"received {received} bytes, {announced} announced")
            if zlib.crc32(payload) != chunk.crc32:
                raise WireError("checksum mismatch: the payload was corrupted in transit")
            return payload
    raise WireError("stream ended before its last chunk")
