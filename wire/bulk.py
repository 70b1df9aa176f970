"""Bulk tensor transfer over a raw TCP side channel, for moving experts between workers.

Why: a gRPC stream costs a serialization, a split, a join and a parse per message,
and Python's per-message overhead on top; on loopback it carried 4% of what a plain
socket does.  Here the sender offers tensors (a gRPC call hands the receiver a
`BulkTicket`), the receiver connects to the sender's bulk port, writes the ticket's
one-time token and reads the raw bytes straight into tensors it preallocated
(`recv_into`, no intermediate copy), checking their length and an xxh3-64 digest.

The sender snapshots (clones) what it offers, so the digest describes exactly what
is sent even if the store changes meanwhile.  An offer is taken once and expires
after `ttl_s`.  Everything a peer can get wrong raises `WireError`.  Where the
process has the cluster's certificates (`internal_tls.py`), both ends speak mutual
TLS over the socket, as their gRPC calls do.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import xxhash
from moecluster.protos import tensor_pb2
from moecluster.wire import internal_tls
from moecluster.wire.tensors import DTYPES, NAMES, WireError

TOKEN_BYTES = 16
OFFER_TTL_S = 30.0
RECV_CHUNK = 4 << 20  # hash as the bytes arrive, in pieces that stay in cache


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's storage as a flat writable byte view (contiguous CPU tensors only)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


@dataclass
class _Offer:
    tensors: list[torch.Tensor]
    expires: float
    release: Callable[[], None] | None = None  # run once when the offer is served, expires or the sender closes


@dataclass
class BulkSender:
    """One listening socket per process; offers are served by a daemon accept thread."""

    host: str = "127.0.0.1"
    port: int = 0
    ttl_s: float = OFFER_TTL_S
    _offers: dict[bytes, _Offer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sock: socket.socket | None = None

    def start(self) -> BulkSender:
        self._sock = socket.create_server((self.host, self.port), backlog=64)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="bulk-sender", daemon=True).start()
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            offers, self._offers = list(self._offers.values()), {}
        for offer in offers:
            _release(offer)

    def offer(self, tensors: list[torch.Tensor], *, copy: bool = True,
              release: Callable[[], None] | None = None) -> tensor_pb2.BulkTicket:
        """Snapshot `tensors` (any device and layout) and return the ticket that fetches them.
        copy=False sends the tensors themselves: the caller keeps them unchanged until `release`
        is called (once: after the send, on expiry, or when the sender closes)."""
        try:
            for t in tensors:
                if t.dtype not in NAMES:
                    raise WireError(f"dtype {t.dtype} cannot travel; supported: {sorted(DTYPES)}")
            snapshot = [t.detach().to("cpu", copy=copy).contiguous() for t in tensors]
            digest = xxhash.xxh3_64()
            for t in snapshot:
                digest.update(_bytes_view(t))
        except BaseException:
            if release is not None:
                release()
            raise
        token = secrets.token_bytes(TOKEN_BYTES)
        now = time.monotonic()
        with self._lock:
            expired = [self._offers.pop(k) for k, o in list(self._offers.items()) if o.expires < now]
            self._offers[token] = _Offer(snapshot, now + self.ttl_s, release)
        for offer in expired:
            _release(offer)
        return tensor_pb2.BulkTicket(
            port=self.port, token=token, nbytes=sum(t.numel() * t.element_size() for t in snapshot),
            digest=digest.intdigest(),
            tensors=[tensor_pb2.TensorMeta(dtype=NAMES[t.dtype], shape=list(t.shape)) for t in snapshot],
        )

    def pending(self) -> int:
        with self._lock:
            return len(self._offers)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), name="bulk-send", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Read a token, send that offer's bytes, close.  An unknown token gets the door shut."""
        with conn:
            try:
                conn.settimeout(self.ttl_s)
                tls = internal_tls.folder()
                if tls is None:
                    self._send(conn)
                else:  # the receiver must present the cluster's certificate, as on its gRPC calls
                    with internal_tls.socket_context(tls, server_side=True).wrap_socket(conn, server_side=True) as wrapped:
                        self._send(wrapped)
            except OSError:
                return  # the receiver went away, or failed the handshake; it will report the short read

    def _send(self, conn: socket.socket) -> None:
        """Sends the bytes of the offer whose token `conn` names; the offer is gone after, sent or not."""
        token = _recv_exact(conn, TOKEN_BYTES)
        with self._lock:
            offer = self._offers.pop(token, None)
        if offer is None:
            return
        try:
            if offer.expires >= time.monotonic():
                for t in offer.tensors:
                    conn.sendall(_bytes_view(t))
        finally:
            _release(offer)


def _release(offer: _Offer) -> None:
    if offer.release is not None:
        offer.release()
        offer.release = None


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise OSError("connection closed")
        got += k
    return bytes(buf)


def receive(host: str, ticket: tensor_pb2.BulkTicket, *, timeout: float, limit_bytes: int,
            into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Fetch a ticket's tensors from `host` (into `into`, if given: same dtypes and shapes, contiguous).
    OSError: the side channel cannot be reached
    (nothing was read); WireError: the ticket or the bytes are wrong (size, dtype, shape,
    digest) or the transfer broke off."""
    tensors, total = [], 0
    for i, meta in enumerate(ticket.tensors):
        dtype = DTYPES.get(meta.dtype)
        if dtype is None or any(d < 0 for d in meta.shape):
            raise WireError(f"bulk ticket tensor {i}: bad dtype {meta.dtype!r} or shape {list(meta.shape)}")
        numel = 1
        for d in meta.shape:
            numel *= d
        total += numel * torch.empty((), dtype=dtype).element_size()
        if total > limit_bytes:
            raise WireError(f"bulk ticket announces over {limit_bytes} bytes")
        tensors.append((dtype, tuple(meta.shape)))
    if total != ticket.nbytes or len(ticket.token) != TOKEN_BYTES:
        raise WireError(f"bulk ticket: {ticket.nbytes} bytes announced for tensors of {total} bytes")
    if into is None:
        out = [torch.empty(shape, dtype=dtype) for dtype, shape in tensors]
    elif [(t.dtype, tuple(t.shape)) for t in into] == tensors and all(t.is_contiguous() for t in into):
        out = into  # straight into the caller's memory (a reserved store slot)
    else:
        raise WireError(f"bulk ticket describes {tensors}, not the {len(into)} tensors to receive into")
    digest = xxhash.xxh3_64()
    conn = socket.create_connection((host, ticket.port), timeout=timeout)  # OSError here: unreachable
    tls = internal_tls.folder()
    if tls is not None:
        try:
            conn = internal_tls.socket_context(tls, server_side=False).wrap_socket(
                conn, server_hostname=internal_tls.SERVER_NAME)
        except OSError:  # ssl.SSLError too: a sender of another cluster, or one without TLS
            conn.close()
            raise
    with conn:
        try:
            conn.sendall(ticket.token)
            for t in out:
                view, got = _bytes_view(t), 0
                while got < len(view):
                    k = conn.recv_into(view[got:], min(RECV_CHUNK, len(view) - got))
                    if k == 0:
                        raise WireError(f"bulk transfer ended after {got} of {len(view)} bytes (offer expired or taken?)")
                    digest.update(view[got:got + k])
                    got += k
        except OSError as err:
            raise WireError(f"bulk transfer from {host}:{ticket.port} broke off: {err}") from None
    if digest.intdigest() != ticket.digest:
        raise WireError("bulk transfer digest mismatch: the bytes were corrupted in transit")
    return out
