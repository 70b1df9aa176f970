"""Who may call a frontend, and over what: API keys and TLS, both read from files a rotation replaces.

    keys = ApiKeys("/etc/moecluster/api-keys/api-keys")      # one key per line; re-read when the file changes
    server = endpoints.server(32, interceptors=[RequireApiKey(keys)])
    add_port(server, "0.0.0.0:50051", ("tls.crt", "tls.key"))

A client sends its key as `authorization: Bearer KEY` (`Client(api_key=...)`). Every method needs
one except gRPC's health service, which load balancers and probes call without. A key's line may
name who holds it and limit their calls and tokens (`KEY name=team-a requests-per-second=20
tokens-per-minute=100000`): calls and tokens are counted by that name, and calls over the rate, or
made once the minute's tokens are used up, are refused with RESOURCE_EXHAUSTED. The limits are the
cluster's: a frontend applies its part of them (`LimitShares`, kept by frontend/limit_reporter.py). Both files are
watched, so a Kubernetes Secret updated in place (its volume is refreshed by the kubelet) takes
effect without a restart: keys within a second, certificates at the next TLS handshake. A file
that turns empty or unreadable keeps the last good keys (a half-written rotation must not lock
everyone out), with a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
from moecluster.wire.rate_limits import LimitShares, RateLimits, TokenBudgets

log = logging.getLogger(__name__)
OPEN_SERVICES = ("grpc.health.v1.Health",)
RECHECK_S = 1.0
API_KEY_ENV = "MOECLUSTER_API_KEY"


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten (a Secret volume swaps a symlink: stat follows it)."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass(frozen=True)
class Caller:
    """Who holds a key, as its line names them: `name` (default: `key-` and 8 hex digits of the key's SHA-256,
    which say nothing of the key) and the calls a second they may make (None: no limit)."""

    name: str
    requests_per_second: float | None = None
    tokens_per_minute: float | None = None  # tokens the frontend computes for them: prompts, and tokens generated


CALLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def parse_keys(text: str) -> dict[bytes, Caller]:
    """A keys file: `KEY [name=NAME] [requests-per-second=R] [tokens-per-minute=T]` a line; blank lines and what
    follows a # at the start of a line or after a space are skipped. ValueError naming the first line that is not
    that."""
    keys: dict[bytes, Caller] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*", "", line)
        if not line.strip():
            continue
        key, *settings = line.split()
        if "=" in key:
            raise ValueError(f"line {number}: starts with a setting, not a key")
        name, rate, tokens = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8], None, None
        for setting in settings:
            field, _, value = setting.partition("=")
            if field == "name" and CALLER_NAME.fullmatch(value):
                name = value
            elif field == "requests-per-second" and _positive(value):
                rate = float(value)
            elif field == "tokens-per-minute" and _positive(value):
                tokens = float(value)
            else:
                raise ValueError(f"line {number}: {setting!r} is not name=NAME (letters, digits, '.', '_', '-'), "
                                 "requests-per-second=R or tokens-per-minute=T (R, T > 0)")
        if key.encode() in keys:
            raise ValueError(f"line {number}: a key listed twice")
        keys[key.encode()] = Caller(name, rate, tokens)
    return keys


def _positive(value: str) -> bool:
    try:
        return 0 < float(value) < float("inf")
    except ValueError:
        return False


class ApiKeys:
    """The keys in a file (`parse_keys`), and who holds each."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        try:
            self._stamp = _stamp(self.path)
            self._keys = parse_keys(self.path.read_text())
        except OSError as err:
            raise ValueError(f"cannot read the API keys file {self.path}: {err.strerror}") from None
        except ValueError as err:
            raise ValueError(f"the API keys file {self.path}, {err}") from None
        if not self._keys:
            raise ValueError(f"the API keys file {self.path} holds no key (one per line)")

    def caller(self, key: str) -> Caller | None:
        """Who holds `key`, None if it is not one of the file's."""
        given, found = key.encode(), None
        for known, caller in self._current().items():  # every key compared: the time says nothing of which matched
            if hmac.compare_digest(given, known):
                found = caller
        return found

    def accepts(self, key: str) -> bool:
        return self.caller(key) is not None

    def _current(self) -> dict[bytes, Caller]:
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return self._keys
        with self._lock:
            if now - self._checked >= RECHECK_S:
                self._checked = now
                self._reload()
        return self._keys

    def _reload(self) -> None:
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            keys = parse_keys(self.path.read_text())
        except OSError as err:
            log.warning("cannot read the API keys file %s (%s): keeping the %d keys read before",
                        self.path, err.strerror, len(self._keys))
            return
        except ValueError as err:
            self._stamp = stamp  # read again once it changes, not every second: one warning per bad edit
            log.warning("the API keys file %s, %s: keeping the %d keys read before", self.path, err, len(self._keys))
            return
        if not keys:
            log.warning("the API keys file %s holds no key now: keeping the %d read before", self.path, len(self._keys))
            return
        self._stamp, self._keys = stamp, keys
        log.info("API keys re-read from %s: %d keys", self.path, len(keys))


def bearer(metadata) -> str:
    """The key of an `authorization: Bearer KEY` entry ("" if none)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


class RequireApiKey(grpc.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, a call without a key `keys` accepts, and, RESOURCE_EXHAUSTED, one over its
    holder's rate or token budget. Place it after RpcLatency in a server's interceptors, so refused calls are
    counted with their code. `calls()`: the calls of each holder let through ("admitted") and refused for their
    rate or budget ("limited"); `tokens()`: the tokens charged to each (`charge`, by the service that computed them)."""

    def __init__(self, keys: ApiKeys, limits: RateLimits | None = None, budgets: TokenBudgets | None = None,
                 shares: LimitShares | None = None):
        """`shares`: this frontend's part of each holder's limits (1 without: it is the only frontend)."""
        self.keys = keys
        self.limits = limits or RateLimits()
        self.budgets = budgets or TokenBudgets()
        self.shares = shares or LimitShares()
        self._lock = threading.Lock()
        self._calls: Counter[tuple[str, str]] = Counter()
        self._tokens: Counter[str] = Counter()
        self._refusals: dict = {}  # (handler, why) -> one refusing so (made once: RpcLatency caches by handler)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        key = bearer(handler_call_details.invocation_metadata)
        caller = self.keys.caller(key) if key else None
        if caller is None:
            why = ("this frontend needs an API key: Client(address, api_key=KEY), the MOECLUSTER_API_KEY environment "
                   "variable, or the metadata `authorization: Bearer KEY`") if not key else "the API key was not accepted"
            return self._refusal(handler, grpc.StatusCode.UNAUTHENTICATED, why)
        rate, budget = caller.requests_per_second, caller.tokens_per_minute
        part = 1.0
        if rate is not None or budget is not None:  # limited: counted where it asks, and held to this frontend's part
            self.shares.asked(caller.name)
            part = self.shares.part(caller.name)
        wait = self.budgets.wait(caller.name, budget * part) if budget is not None else 0.0
        admitted = wait == 0.0 and (rate is None or self.limits.take(caller.name, rate * part))
        with self._lock:
            self._calls[(caller.name, "admitted" if admitted else "limited")] += 1
        if admitted:
            return handler
        why = (f"{caller.name} has used its {budget:g} tokens/min: retry in {math.ceil(wait)} s" if wait
               else f"{caller.name} is over its {rate:g} requests/s: slow down and retry")
        return self._refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, why)

    def charge(self, metadata, tokens: int) -> None:
        """`tokens` computed for the call whose metadata this is, taken from its holder's budget."""
        caller = self.keys.caller(bearer(metadata)) if tokens > 0 else None
        if caller is None:
            return
        with self._lock:
            self._tokens[caller.name] += tokens
        if caller.tokens_per_minute is not None:
            self.budgets.charge(caller.name, tokens, caller.tokens_per_minute * self.shares.part(caller.name))

    def calls(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._calls)

    def tokens(self) -> dict[str, int]:
        with self._lock:
            return dict(self._tokens)

    def _refusal(self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode, why: str) -> grpc.RpcMethodHandler:
        refusal = self._refusals.get((handler, why))
        if refusal is None:
            refusal = self._refusals[(handler, why)] = _refusing(handler, code, why)
        return refusal


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, why: str) -> grpc.RpcMethodHandler:
    def refuse(request, context):
        context.abort(code, why)

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler), ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    make = next(make for kind, make in kinds if getattr(handler, kind))
    return make(refuse, handler.request_deserializer, handler.response_serializer)


def tls_files(cert_file, key_file) -> tuple[str, str] | None:
    """(certificate, key) to serve TLS with, None for plaintext; one without the other is refused."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    return (str(cert_file), str(key_file)) if cert_file else None


def add_port(server: grpc.Server, address: str, tls: tuple[str, str] | None = None) -> int:
    """Listens on `address`: plaintext, or TLS from `tls` = (certificate file, key file). The port it got (0: none)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(*tls))  # one per port: gRPC cannot share them


def server_credentials(cert_file: str | os.PathLike, key_file: str | os.PathLike) -> grpc.ServerCredentials:
    """TLS from a PEM certificate chain and its key, re-read at a handshake after either file changed. For one
    port only: a second port given the same credentials fails to bind (gRPC consumes their first certificate)."""
    cert_path, key_path = Path(cert_file), Path(key_file)

    def load() -> grpc.ServerCertificateConfiguration:
        key, cert = key_path.read_bytes(), cert_path.read_bytes()
        for path, data, marker, what in ((cert_path, cert, b"CERTIFICATE-----", "certificate"),
                                         (key_path, key, b"PRIVATE KEY-----", "private key")):
            if marker not in data:
                raise ValueError(f"{path} is not a PEM {what}")
        return grpc.ssl_server_certificate_configuration([(key, cert)])

    def stamps() -> tuple:
        return _stamp(cert_path), _stamp(key_path)

    try:
        seen, first = [stamps()], load()  # seen: the files as last looked at, whether they loaded or not
    except OSError as err:
        raise ValueError(f"cannot read the TLS certificate or key ({err.filename}): {err.strerror}") from None

    def fetch() -> grpc.ServerCertificateConfiguration | None:  # gRPC calls this at each new handshake
        try:
            now = stamps()
            if now == seen[0]:
                return None  # unchanged: keep serving what was loaded
            seen[0] = now
            config = load()
            log.info("TLS certificate re-read from %s", cert_path)
            return config
        except (OSError, ValueError) as err:  # half-written, or gone: the last good one stays
            log.warning("cannot use the TLS certificate or key (%s): keeping the one read before", err)
            return None

    return grpc.dynamic_ssl_server_credentials(first, fetch)


def channel_credentials(tls: bool | str | os.PathLike | bytes) -> grpc.ChannelCredentials:
    """A client's TLS: True trusts the system's roots; a path or PEM bytes, that CA bundle."""
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(root_certificates=tls)
    try:
        return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())
    except OSError as err:
        raise ValueError(f"cannot read the CA bundle {tls}: {err.strerror}") from None
