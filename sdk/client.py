"""The Python client: logits and generations from a running moecluster.

    from moecluster import Client
    client = Client("127.0.0.1:50051")
    logits = client.forward(torch.tensor([[1, 2, 3]]))       # (B, T, V) float32
    tokens = client.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)

Reads (forward, generate, info, status) are idempotent: once a client has reached its frontend, it
retries them on UNAVAILABLE until their deadline, so a frontend that restarts (or a pod of several
that dies) costs latency, not failed requests. A client that never reached one fails at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import torch
from moecluster.protos import frontend_pb2, frontend_pb2_grpc
from moecluster.sdk.http_transport import HttpFrontendStub
from moecluster.wire import access, endpoints, retry, streaming
from moecluster.wire.tensors import decode, encode


class MoEClusterError(RuntimeError):
    """A request the cluster did not answer; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    address: str
    pid: int
    state: str
    experts: list[tuple[int, int]] = field(default_factory=list)
    device: str = ""  # where its experts live: "cpu", "cuda:0", ...


@dataclass(frozen=True)
class ClusterStatus:
    model: str
    family: str
    epoch: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    workers: list[WorkerInfo]
    requests: int
    failed: int
    frontend_device: str = ""  # where the answering frontend runs the dense model


class Client:
    def __init__(self, address: str, *, timeout: float = 60.0, application: str = "", api_key: str | None = None,
                 tls: bool | str | os.PathLike | bytes = False, tls_server_name: str = ""):
        """`address` is the frontend's "host:port" (gRPC), or an HTTP base address such as
        "http://127.0.0.1:8000/NAME" (a Ray Serve frontend); `timeout` is each call's deadline in seconds;
        `application` names the cluster behind a Ray Serve gRPC proxy that serves several.

        `api_key` is sent with every call (default: the MOECLUSTER_API_KEY environment variable), for a
        frontend started with API keys. `tls` connects over TLS: True trusts the system's CAs, a path or PEM
        bytes that CA bundle; `tls_server_name` is the name the certificate must carry where the address
        is not it (`kubectl port-forward`: 127.0.0.1 for a certificate of NAME.NAMESPACE.svc)."""
        if ":" not in address:
            raise ValueError(f"address {address!r} should be host:port, e.g. 127.0.0.1:50051")
        self.address = address
        self.timeout = timeout
        self.http = address.startswith(("http://", "https://"))
        self._tls = bool(tls)
        api_key = os.environ.get(access.API_KEY_ENV, "") if api_key is None else api_key
        if self.http:
            if tls or tls_server_name:
                raise ValueError("tls and tls_server_name are for gRPC addresses; an HTTP one says https://")
            self._channel = None
            self._stub = HttpFrontendStub(address)
        else:
            options = [*streaming.GRPC_OPTIONS, *([("grpc.ssl_target_name_override", tls_server_name)]
                                                  if tls_server_name else [])]
            credentials = access.channel_credentials(tls) if tls else None
            # endpoints.channel finds a restarted frontend fast
            self._channel = endpoints.channel(address, options=options, credentials=credentials)
            metadata = ([("application", application)] if application else []) + (
                [("authorization", f"Bearer {api_key}")] if api_key else [])
            channel = grpc.intercept_channel(self._channel, _Metadata(metadata)) if metadata else self._channel
            self._stub = frontend_pb2_grpc.FrontendStub(channel)
        self._info: frontend_pb2.InfoResponse | None = None
        self._reached = False  # a frontend answered here once: UNAVAILABLE from now on is a restart, not a typo

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, T) -> logits FloatTensor (B, T, V)."""
        ids = _ids(input_ids)
        request = frontend_pb2.ForwardRequest(input_ids=encode(ids))
        logits_bytes = ids.numel() * self.info().vocab_size * 4
        if not self.http and streaming.needs_streaming(max(request.ByteSize(), logits_bytes)):
            response = self._read(lambda t: frontend_pb2.ForwardResponse.FromString(streaming.join(
                self._stub.ForwardStream(streaming.split(request.SerializeToString()), timeout=t),
                limit_bytes=1 << 36)))
        else:
            response = self._read(lambda t: self._stub.Forward(request, timeout=t))
        return decode(response.logits).clone()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, *, do_sample: bool = False,
                 seed: int = 0, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, until_eos: bool = False, stop_tokens: Sequence[int] = ()) -> torch.Tensor:
        """LongTensor (B, T) -> (B, T + max_new_tokens), greedy unless `do_sample`. Sampled, row r draws as
        `torch.manual_seed(seed + r)` then transformers' `generate` of that row alone would, whatever else the
        frontend decodes meanwhile; `temperature`, `top_k` (0: every token) and `top_p` left out are the
        checkpoint's generation_config.json, else transformers' defaults (1.0, 50, 1.0). `until_eos`: a row
        ends at the checkpoint's end-of-sequence token (`info().eos_token_ids`), padded with 0 after it; else it has exactly
        `max_new_tokens` tokens, never that one. `stop_tokens`: token ids that end a row too (kept)."""
        request = _generate_request(input_ids, max_new_tokens, do_sample, seed, temperature, top_k, top_p, until_eos,
                                    stop_tokens)
        response = self._read(lambda t: self._stub.Generate(request, timeout=t))
        return decode(response.sequences).clone()

    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int = 16, *, do_sample: bool = False,
                        seed: int = 0, temperature: float | None = None, top_k: int | None = None,
                        top_p: float | None = None, until_eos: bool = False,
                        stop_tokens: Sequence[int] = ()) -> Iterator[tuple[int, list[int]]]:
        """`generate`, but yields `(row, tokens)` as the frontend decodes them: a row's tokens joined are the
        ones `generate` answers (ending early: up to and with its stop token, no padding). Asked
        again on UNAVAILABLE only until its first tokens came (a retry later would repeat them); leaving the
        loop early cancels the call, which stops the generation. The whole stream has the client's `timeout`
        (over HTTP, a Ray Serve frontend's: each read's)."""
        request = _generate_request(input_ids, max_new_tokens, do_sample, seed, temperature, top_k, top_p, until_eos,
                                    stop_tokens)

        def start(left: float):
            call = self._stub.GenerateStream(request, timeout=left)
            return call, next(call, None)

        call, chunk = self._read(start)
        try:
            while chunk is not None:
                yield chunk.row, list(chunk.tokens)
                chunk = self._call(lambda: next(call, None))
        finally:
            call.cancel()  # a no-op once the stream ended

    def info(self) -> frontend_pb2.InfoResponse:
        """The served model: family, vocab_size, num_moe_layers, num_experts, top_k, hidden_size (cached)."""
        if self._info is None:
            self._info = self._read(lambda t: self._stub.Info(frontend_pb2.InfoRequest(), timeout=t))
        return self._info

    def status(self) -> ClusterStatus:
        r = self._read(lambda t: self._stub.Status(frontend_pb2.StatusRequest(), timeout=t))
        workers = [WorkerInfo(w.id, w.address, w.pid, w.state, list(zip(w.experts[::2], w.experts[1::2])), w.device)
                   for w in r.workers]
        return ClusterStatus(r.model, r.family, r.epoch, r.num_moe_layers, r.num_experts, r.top_k, workers,
                             r.requests, r.failed, r.device)

    def scale(self, workers: int, *, progress=None, timeout: float = 600.0) -> int:
        """Asks the cluster's controller for `workers` expert workers; returns the epoch once the new layout serves.

        `progress`, if given, is called with each progress line.
        """
        from moecluster.protos import controller_pb2

        return self._admin("Scale", controller_pb2.ScaleRequest(workers=workers), progress, timeout)

    def drain(self, worker: str, *, replace: bool = False, progress=None, timeout: float = 600.0) -> int:
        """Moves `worker`'s experts away and stops it (the pool shrinks by one); with `replace`, a new worker
        starts first and takes them (the pool keeps its size). Returns the epoch once it is done; asked again
        for the same worker, it waits for that drain and removes no other."""
        from moecluster.protos import controller_pb2

        return self._admin("Drain", controller_pb2.DrainRequest(worker=worker, replace=replace), progress, timeout)

    def _admin(self, call: str, request, progress, timeout: float) -> int:
        """One of the controller's admin streams, asked again across a controller restart (each is safe to
        repeat, `wire/retry.py`); the epoch of its last line."""
        from moecluster.protos import controller_pb2_grpc

        address = self.info().controller
        if not address:
            raise MoEClusterError(grpc.StatusCode.FAILED_PRECONDITION, f"this frontend has no controller to ask ({call})")
        with endpoints.internal_channel(address) as channel:  # the cluster's certificates, if it asks for them
            stub = controller_pb2_grpc.ControllerStub(channel)
            say = progress or (lambda line: None)
            epoch = 0
            try:
                for update in retry.stream_again_on_unavailable(
                        lambda left: getattr(stub, call)(request, timeout=left),
                        timeout=timeout, on_retry=lambda err: say(retry.asking_again(err))):
                    epoch = update.epoch
                    if not update.done:
                        say(update.message)
            except grpc.RpcError as err:
                detail = err.details() or err.code().name
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    detail = f"the controller at {address} did not answer within {retry.CONTROLLER_BACK_S:.0f}s: {detail}"
                raise MoEClusterError(err.code(), detail) from None
            return epoch

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Blocks until the frontend's channel is up, or raises MoEClusterError."""
        if self.http:
            self.info()
            return
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise MoEClusterError(grpc.StatusCode.UNAVAILABLE, f"no frontend at {self.address} after {timeout}s") from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, call):
        """`call(timeout)` of an idempotent method, retried on UNAVAILABLE within one deadline once this
        client has reached its frontend."""
        started = time.monotonic()
        deadline = started + self.timeout
        pause, retried = retry.FIRST_PAUSE_S, False  # the admin streams' backoff
        while True:
            try:
                result = self._call(lambda: call(max(deadline - time.monotonic(), 0.001)))
            except MoEClusterError as err:
                again = self._reached and err.code == grpc.StatusCode.UNAVAILABLE
                if not (again and time.monotonic() + pause < deadline):
                    if retried:
                        waited = time.monotonic() - started
                        raise MoEClusterError(err.code, f"{err.message} (retried for {waited:.0f}s)") from None
                    raise
                time.sleep(pause)
                pause, retried = min(pause * 2, retry.MAX_PAUSE_S), True
                continue
            self._reached = True
            return result

    def _call(self, fn):
        try:
            return fn()
        except grpc.RpcError as err:
            detail = err.details() or ""
            if err.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in detail.lower():
                tls = ("over TLS: is tls= the CA of its certificate, and tls_server_name= a name on it?" if self._tls
                       else "a frontend serving TLS needs tls=CA_FILE")
                detail = f"no frontend reachable at {self.address} (is the cluster up? `moectl status`; {tls}): {detail}"
            raise MoEClusterError(err.code(), detail) from None


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds metadata to every call: the API key, and Ray Serve's `application` (its gRPC proxy routes by it)."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def _with(self, details):
        return details._replace(metadata=list(details.metadata or []) + self.pairs)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with(details), request_iterator)


def _generate_request(input_ids, max_new_tokens: int, do_sample: bool, seed: int, temperature: float | None,
                      top_k: int | None, top_p: float | None, until_eos: bool,
                      stop_tokens: Sequence[int]) -> frontend_pb2.GenerateRequest:
    sampling = {k: v for k, v in {"temperature": temperature, "top_k": top_k, "top_p": top_p}.items() if v is not None}
    return frontend_pb2.GenerateRequest(input_ids=encode(_ids(input_ids)), max_new_tokens=max_new_tokens,
                                        do_sample=do_sample, seed=seed, until_eos=until_eos,
                                        stop_tokens=list(stop_tokens), **sampling)


def _ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be integer token ids, got {ids.dtype}")
    return ids.long()
