"""The frontend process: the dense model + router, experts on the workers.

    python -m moecluster.frontend.server --checkpoint DIR --controller HOST:PORT [--port 50051]

Serves `moecluster.frontend.v1.Frontend` (Forward, Generate, Info, Status) and
grpc.health.v1. It routes by the controller's routing table, follows every new
epoch and acknowledges it, and keeps serving on its last table while the
controller is away. Prometheus metrics are on http://HOST:PORT/metrics
(--metrics-port; the ready file's "metrics" names the address).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from moecluster.frontend.dense_model import load_dense_model
from moecluster.frontend.dispatcher import Dispatcher, ExpertUnavailableError
from moecluster.frontend.ending import Ending, EndingError, eos_tokens
from moecluster.frontend.forward_batcher import ForwardBatcher
from moecluster.frontend.generation_batcher import (
    BATCHED_FAMILIES,
    GenerationBatcher,
    GenerationFailed,
    GenerationStopped,
    OnTokens,
)
from moecluster.frontend.routing import RoutingTable
from moecluster.frontend.sampling import RowSampler, SampledRows, Sampling, SamplingError
from moecluster.frontend.table_watcher import TableWatcher
from moecluster.frontend.token_stream import RowStreamer, StopWhenSet, TokenStream
from moecluster.models.checkpoint import Checkpoint
from moecluster.models.devices import resolve_device
from moecluster.observability.prometheus import Histogram, frontend_metrics, serve_metrics
from moecluster.observability.rpc_latency import RpcLatency
from moecluster.observability.tracing import configure_tracing
from moecluster.protos import frontend_pb2, frontend_pb2_grpc, worker_pb2, worker_pb2_grpc
from moecluster.wire import access, endpoints, streaming
from moecluster.wire.ready import announce_ready, stop_signal
from moecluster.wire.tensors import WireError, decode, encode
from transformers import StoppingCriteriaList

MAX_BATCH_TOKENS = 65536
MAX_NEW_TOKENS = 4096
DEFAULT_CACHE_TOKENS = 4096  # KV cache of the generations decoded together, in tokens of all their sequences
DEFAULT_FORWARD_BATCH_TOKENS = 2048  # tokens of concurrent Forward requests computed as one forward


class FrontendService(frontend_pb2_grpc.FrontendServicer):
    def __init__(self, checkpoint: Checkpoint, dispatcher: Dispatcher, *, model_name: str = "", controller: str = "",
                 device: torch.device | str = "cpu", generate_cache_tokens: int = DEFAULT_CACHE_TOKENS,
                 forward_batch_tokens: int = DEFAULT_FORWARD_BATCH_TOKENS, charge=None):
        """`device`: where the dense model runs (cpu, cuda, cuda:N, auto; ValueError when unusable here).
        `generate_cache_tokens`: the KV cache of the generations decoded together (generation_batcher.py);
        0 decodes each request on its own. `forward_batch_tokens`: the most tokens of concurrent Forward requests
        computed as one forward (forward_batcher.py); 0 computes each on its own. `charge(metadata, tokens)`: told
        the tokens each call computed (prompt and generated), with the call's metadata (RequireApiKey.charge)."""
        if forward_batch_tokens < 0:
            raise ValueError(f"forward_batch_tokens is {forward_batch_tokens}; 0 (each request alone) or more")
        self.checkpoint = checkpoint
        self.dispatcher = dispatcher
        self.device = resolve_device(device)
        self.model = load_dense_model(checkpoint, dispatcher, device=self.device)
        self.vocab = self.model.config.vocab_size
        self.model_name = model_name or str(checkpoint.path)
        self.controller = controller
        self.charge = charge
        self._lock = threading.Lock()
        self.requests = 0
        self.failed = 0
        self.generated_tokens = 0  # new tokens answered, of all rows
        self.first_token = Histogram("moecluster_frontend_first_token_seconds",
                                     "GenerateStream calls: how long until their first tokens went out (seconds)")
        batched = generate_cache_tokens and checkpoint.config.model_type in BATCHED_FAMILIES
        self.generations = GenerationBatcher(self.model, cache_tokens=generate_cache_tokens) if batched else None
        self.forwards = ForwardBatcher(self._logits, forward_batch_tokens) if forward_batch_tokens else None

    # -- RPCs ------------------------------------------------------------

    def Forward(self, request, context):
        return self._guard(context, lambda: self._forward(request, context))

    def ForwardStream(self, request_iterator, context):
        def run():
            payload = streaming.join(request_iterator, limit_bytes=MAX_BATCH_TOKENS * 8 + 4096)
            return self._forward(frontend_pb2.ForwardRequest.FromString(payload), context)

        response = self._guard(context, run)
        yield from streaming.split(response.SerializeToString())

    def _forward(self, request, context):
        ids = self._input_ids(request.input_ids)
        logits = self.forwards.forward(ids) if self.forwards else self._logits(ids)
        self._charge(context, ids.numel())
        return frontend_pb2.ForwardResponse(logits=encode(logits))

    def _charge(self, context, tokens: int) -> None:
        """The tokens computed for a call, charged to its API key's holder (wire/access.py) where keys are asked."""
        if self.charge is not None and hasattr(context, "invocation_metadata"):
            self.charge(context.invocation_metadata(), tokens)

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=ids.to(self.device)).logits.float().cpu()

    def Generate(self, request, context):
        stop = threading.Event()  # set when the call ends: a client that cancels or times out stops its generation
        if hasattr(context, "add_callback"):
            context.add_callback(stop.set)
        return self._guard(context, lambda: frontend_pb2.GenerateResponse(sequences=encode(
            self._generate(request, context, stop=stop))))

    def GenerateStream(self, request, context):
        """Each row's new tokens as they are decoded, as chunks (row, tokens): a row's chunks joined are the
        tokens Generate answers. A client that cancels (or whose deadline passes) stops its generation."""
        stream = TokenStream(lambda on_tokens, stop: self._generate(request, context, on_tokens, stop))
        if hasattr(context, "add_callback"):  # gRPC's: called when the RPC ends, however it ends
            context.add_callback(stream.close)
        chunks, started = iter(stream), time.perf_counter()
        try:
            while (chunk := self._guard(context, lambda: next(chunks, None), counted=started is not None)) is not None:
                if started is not None:
                    self.first_token.observe(time.perf_counter() - started)
                    started = None
                yield frontend_pb2.GenerateChunk(row=chunk[0], tokens=chunk[1])
        finally:
            stream.close()  # closed early (its reader went away): the generation stops too

    def _generate(self, request, context, on_tokens: OnTokens | None = None,
                  stop: threading.Event | None = None) -> torch.Tensor:
        """(B, T + max_new_tokens) on the CPU; `on_tokens(row, tokens)` as they are decoded; GenerationStopped
        once `stop` is set."""
        ids = self._input_ids(request.input_ids).to(self.device)
        if not 1 <= request.max_new_tokens <= MAX_NEW_TOKENS:
            raise WireError(f"max_new_tokens: {request.max_new_tokens}, expected 1..{MAX_NEW_TOKENS}")
        new = request.max_new_tokens
        sampling = self._sampling(request)
        try:
            ending = Ending.of(eos_tokens(self.model.generation_config), until_eos=request.until_eos,
                               stop_tokens=request.stop_tokens, vocab=self.vocab)
        except EndingError as err:
            raise WireError(str(err)) from None
        streamed = [0]  # tokens handed on so far: what a stream stopped early is charged
        if on_tokens is not None:
            on_tokens = _counting(on_tokens, streamed)
        try:
            out, made_tokens = self._decode(ids, new, sampling, ending, context, on_tokens, stop)
        except GenerationStopped:
            self._charge(context, ids.numel() + streamed[0])
            raise
        with self._lock:
            self.generated_tokens += made_tokens
        self._charge(context, ids.numel() + made_tokens)
        return out

    def _decode(self, ids, new: int, sampling, ending: Ending, context, on_tokens, stop) -> tuple[torch.Tensor, int]:
        """(the rows and their new tokens, padded; how many tokens the rows made), in the batch or alone."""
        rows = ids.shape[0]
        if self.generations and self.generations.fits(ids.shape[1], new) and rows:
            remaining = context.time_remaining() if hasattr(context, "time_remaining") else None  # Ray's has none
            timeout = remaining if remaining is not None else 600.0
            made = self.generations.generate(ids.tolist(), new, timeout=timeout, sampling=sampling,
                                             on_tokens=on_tokens, stop=stop, ending=ending)
            tokens = torch.zeros((rows, new), dtype=torch.long)  # 0 pads a row that ended early, as generate pads
            for r, row in enumerate(made):
                tokens[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            out, made_tokens = torch.cat([ids.cpu(), tokens], 1), sum(len(row) for row in made)
        else:
            # Decoded alone; a sampled row draws with its own generator, not torch's global one other requests share
            draws = [SampledRows([RowSampler(sampling, r, self.device) for r in range(rows)])] if sampling else None
            ends = {"eos_token_id": list(ending.stops)} if ending.stops else {"min_new_tokens": new}
            if ending.stops and ending.never:
                ends["suppress_tokens"] = list(ending.never)
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, pad_token_id=0,
                                          do_sample=False, logits_processor=draws, **ends,
                                          streamer=RowStreamer(on_tokens, ending.stops) if on_tokens else None,
                                          stopping_criteria=StoppingCriteriaList([StopWhenSet(stop)]) if stop else None)
            if stop is not None and stop.is_set():
                raise GenerationStopped("the caller stopped waiting")
            out = torch.nn.functional.pad(out.cpu(), (0, ids.shape[1] + new - out.shape[1]))  # every row ended early
            made_tokens = sum(ending.made(row) for row in out[:, ids.shape[1]:].tolist())
        return out, made_tokens

    def _sampling(self, request) -> Sampling | None:
        given = {name: getattr(request, name) for name in ("temperature", "top_k", "top_p") if request.HasField(name)}
        if not request.do_sample:
            if given:
                raise WireError(f"{', '.join(given)}: for sampled requests only (do_sample)")
            return None
        try:
            return Sampling.resolve(self.model.generation_config, request.seed, **given)
        except SamplingError as e:
            raise WireError(str(e)) from None

    def Info(self, request, context):
        g = self.checkpoint.geometry
        return frontend_pb2.InfoResponse(
            model=self.model_name, family=self.checkpoint.config.model_type, vocab_size=self.vocab,
            num_moe_layers=len(g.moe_layers), num_experts=g.num_experts, top_k=g.top_k, hidden_size=g.hidden,
            controller=self.controller, device=str(self.device),
            generate_cache_tokens=self.generations.capacity if self.generations else 0,
            forward_batch_tokens=self.forwards.max_tokens if self.forwards else 0,
            eos_token_ids=eos_tokens(self.model.generation_config))

    def Status(self, request, context):
        table = self.dispatcher.table
        g = self.checkpoint.geometry
        workers = []
        for worker_id, address in sorted(table.workers.items()):
            status = frontend_pb2.WorkerStatus(id=worker_id, address=address, state="unreachable")
            try:
                with endpoints.internal_channel(address) as channel:
                    stats = worker_pb2_grpc.ExpertWorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=2.0)
                status.pid = stats.pid
                status.state = "draining" if stats.draining else "serving"
                status.device = stats.device
                status.experts.extend(v for k in stats.held for v in (k.layer, k.expert))
            except grpc.RpcError:
                pass
            workers.append(status)
        with self._lock:
            requests, failed = self.requests, self.failed
        return frontend_pb2.StatusResponse(
            model=self.model_name, family=self.checkpoint.config.model_type, num_moe_layers=len(g.moe_layers),
            num_experts=g.num_experts, top_k=g.top_k, epoch=table.epoch, workers=workers,
            requests=requests, failed=failed, device=str(self.device))

    def close(self) -> None:
        """Stops the batched generation loop (requests still in it fail) and the forward batcher's threads."""
        if self.generations:
            self.generations.close()
        if self.forwards:
            self.forwards.close()

    # -- helpers -----------------------------------------------------------

    def _input_ids(self, message) -> torch.Tensor:
        ids = decode(message, name="input_ids")
        if ids.dtype not in (torch.int64, torch.int32):
            raise WireError(f"input_ids: dtype {message.dtype}, expected int64")
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise WireError(f"input_ids: shape {list(ids.shape)}, expected [B, T] with T >= 1")
        if ids.numel() > MAX_BATCH_TOKENS:
            raise WireError(f"input_ids: {ids.numel()} tokens, more than the limit of {MAX_BATCH_TOKENS}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise WireError(f"input_ids: token ids must be in [0, {self.vocab - 1}], got {int(ids.min())}..{int(ids.max())}")
        return ids.long().clone()

    def _guard(self, context, run, counted: bool = True):
        """run(), its errors answered with their gRPC status; `counted`: a request (a stream's first step)."""
        if counted:
            with self._lock:
                self.requests += 1
        try:
            return run()
        except WireError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except (ExpertUnavailableError, GenerationFailed) as err:
            with self._lock:
                self.failed += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except TimeoutError as err:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
        except GenerationStopped as err:
            context.abort(grpc.StatusCode.CANCELLED, str(err))


def _counting(on_tokens: OnTokens, count: list[int]) -> OnTokens:
    def counted(row: int, tokens: list[int]) -> None:
        count[0] += len(tokens)
        on_tokens(row, tokens)

    return counted


class FrontendServer:
    def __init__(self, checkpoint: str | Path, controller: str, *, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 30.0, max_workers: int = 32, frontend_id: str = "", cluster: str = "",
                 device: str = "cpu", generate_cache_tokens: int = DEFAULT_CACHE_TOKENS,
                 forward_batch_tokens: int = DEFAULT_FORWARD_BATCH_TOKENS, api_keys: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None):
        """`max_workers`: requests served at once (a generation waiting in the running batch holds one).
        `api_keys`: a file of the keys a client must send (none: any client); `tls_cert` and `tls_key`: PEM
        files to serve TLS with (none: plaintext). See wire/access.py."""
        tls = access.tls_files(tls_cert, tls_key)
        if tls:
            access.server_credentials(*tls)  # a bad file fails here, before the model loads
        self.guard = access.RequireApiKey(access.ApiKeys(api_keys)) if api_keys else None  # limits shared out below
        self.dispatcher = Dispatcher(RoutingTable(0, {}), timeout=timeout)
        self.service = FrontendService(Checkpoint(checkpoint), self.dispatcher, controller=controller, device=device,
                                       generate_cache_tokens=generate_cache_tokens,
                                       forward_batch_tokens=forward_batch_tokens,
                                       charge=self.guard.charge if self.guard else None)
        self.health = health.HealthServicer()
        self.watcher = TableWatcher(controller, self.dispatcher, frontend_id or f"frontend-{os.getpid()}", cluster=cluster,
                                    shares=self.guard.shares if self.guard else None)
        self.rpc_latency = RpcLatency("moecluster_frontend_rpc_seconds")
        self.server = endpoints.server(max_workers, options=streaming.GRPC_OPTIONS,
                                       interceptors=[self.rpc_latency, *filter(None, [self.guard])])  # refused calls timed too
        frontend_pb2_grpc.add_FrontendServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        hosts = host.split(",")  # the first is where it is reached; e.g. a pod's IP, then 127.0.0.1 for port-forward
        self.port = port
        for one in hosts:
            self.port = access.add_port(self.server, f"{one}:{self.port}", tls)
            if self.port == 0:
                raise OSError(f"cannot listen on {one}:{port} (in use?)")
        self.address = f"{hosts[0]}:{self.port}"

    def start(self, table_timeout: float = 60.0) -> "FrontendServer":
        """Serves once the first routing table has arrived."""
        self.watcher.start()
        if not self.watcher.first_table.wait(table_timeout):
            raise OSError(f"no routing table from the controller at {self.watcher.controller} after {table_timeout}s")
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float = 5.0) -> None:
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.watcher.stop()
        self.server.stop(grace).wait()
        self.service.close()
        self.dispatcher.close()

    def render_metrics(self) -> str:
        """Prometheus text for /metrics, from the service's counters and the dispatcher's state."""
        d, forwards = self.dispatcher, self.service.forwards
        return frontend_metrics(requests=self.service.requests, failed=self.service.failed, retries=d.retries,
                                wire_bytes=d.wire_bytes, epoch=d.table.epoch, outstanding=d.outstanding(),
                                generated_tokens=self.service.generated_tokens, latency=self.rpc_latency.histogram,
                                forward_batches=forwards.forwards if forwards else 0,
                                batched_forwards=forwards.requests if forwards else 0,
                                client_calls=self.guard.calls() if self.guard else None,
                                client_tokens=self.guard.tokens() if self.guard else None,
                                client_limit_parts=self.guard.shares.parts() if self.guard else None,
                                first_token=self.service.first_token)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--controller", required=True, help="the controller's host:port (routing table source)")
    parser.add_argument("--cluster", default="", help="NAMESPACE/NAME: the cluster to ask for, where the controller "
                        "endpoint serves several (the Kubernetes operator's)")
    parser.add_argument("--frontend-id", default="", help="name reported to the controller (default frontend-PID)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; several comma-separated (the same "
                        "port on each), e.g. a pod's IP and 127.0.0.1 so that `kubectl port-forward` reaches it")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each worker RPC, seconds")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the dense model (embeddings, attention, router) runs: "
                        "cpu, cuda, cuda:N, or auto (a GPU where this process sees one); expert inputs and outputs "
                        "cross to the CPU at each MoE layer")
    parser.add_argument("--generate-cache-tokens", type=int, default=DEFAULT_CACHE_TOKENS,
                        help="Generate requests, greedy and sampled, are decoded together in one running batch "
                             "(transformers' continuous batching) with a KV cache of this many tokens (default "
                             f"{DEFAULT_CACHE_TOKENS}; a request that does not fit, or one of a family it does not take, "
                             "is decoded alone); 0: every request alone")
    parser.add_argument("--forward-batch-tokens", type=int, default=DEFAULT_FORWARD_BATCH_TOKENS, metavar="N",
                        help="Forward requests that arrive while the frontend computes others are computed together "
                             f"as one forward of up to N of their tokens (default {DEFAULT_FORWARD_BATCH_TOKENS}); "
                             "0: every request alone")
    parser.add_argument("--api-keys", metavar="FILE", help="serve only clients that send one of the keys in FILE as "
                        "`authorization: Bearer KEY`; a line: `KEY [name=NAME] [requests-per-second=R]` (calls "
                        "counted by NAME; over R a second refused); re-read when it changes (a rotated Secret)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate chain (with --tls-key); "
                        "re-read at a handshake after it changes")
    parser.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    parser.add_argument("--ready-file", type=Path, help="write {address, pid} here once serving")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: any free; -1: off)")
    args = parser.parse_args(argv)
    configure_tracing("moecluster-frontend")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        frontend = FrontendServer(args.checkpoint, args.controller, host=args.host, port=args.port, timeout=args.timeout,
                                  frontend_id=args.frontend_id, cluster=args.cluster, device=args.device,
                                  generate_cache_tokens=args.generate_cache_tokens,
                                  forward_batch_tokens=args.forward_batch_tokens, api_keys=args.api_keys,
                                  tls_cert=args.tls_cert, tls_key=args.tls_key).start()
        metrics_host = args.host.split(",")[0]
        metrics = serve_metrics(frontend.render_metrics, args.metrics_port, metrics_host) if args.metrics_port >= 0 else None
    except (ValueError, OSError) as err:
        sys.exit(f"frontend: {err}")
    stopped = stop_signal()
    announce_ready(args.ready_file, frontend.address, **({"metrics": metrics.address} if metrics else {}))
    print(f"frontend serving {args.checkpoint} on {frontend.address}", flush=True)
    stopped.wait()
    frontend.stop()
    if metrics:
        metrics.stop()


if __name__ == "__main__":
    main()
