"""The frontend on Ray: a Ray Serve application, its replicas autoscaled by Serve.

Each replica is a `FrontendService` (transformers' dense model, the dispatcher,
a table watcher acknowledging the controller's epochs as any frontend does).
HTTP ingress speaks the frontend's own messages: POST `/NAME/Forward` (and
`/Generate`, `/Info`, `/Status`) with a serialized `moecluster.frontend.v1`
request as the body answers with the serialized response (`Client("http://...")`
does this), `/GenerateStream` with frames of chunks (sdk/http_transport.py); a
failed call answers 400 (bad input) or 503 (no live copy of an expert) with the
reason as text. With a gRPC port in the cluster's settings, Serve's gRPC proxy
serves the same methods too (Ray binds it on every interface).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import grpc
from moecluster.protos import frontend_pb2
from moecluster.sdk.http_transport import CHUNK, FAILURE, frame
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

METHODS = {"Forward": frontend_pb2.ForwardRequest, "Generate": frontend_pb2.GenerateRequest,
           "GenerateStream": frontend_pb2.GenerateRequest, "Info": frontend_pb2.InfoRequest,
           "Status": frontend_pb2.StatusRequest}
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAVAILABLE: 503}


class CallFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    """What FrontendService needs of a gRPC context: abort(code, details), and callbacks for when the call
    ends (`end`: a streaming reader went away)."""

    def __init__(self):
        self._callbacks = []

    def abort(self, code: grpc.StatusCode, details: str):
        raise CallFailed(code, details)

    def add_callback(self, callback) -> bool:
        self._callbacks.append(callback)
        return True

    def end(self) -> None:
        for callback in self._callbacks:
            callback()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class MoEFrontend:
    def __init__(self, model: str, controller: str, name: str, device: str = "cpu",
                 settings: dict[str, int] | None = None, tls: dict[str, str] | None = None):
        """`settings`: the spec's serving keywords for FrontendService (ClusterSpec.frontend_settings); `tls`: the
        cluster's certificates (internal_tls.pems), for its calls to the controller and workers."""
        from moecluster.wire import internal_tls

        os.environ.pop(internal_tls.ENV, None)  # the cluster's certificates or none, not what Ray's process inherited
        if tls:
            internal_tls.install(tls)
        from moecluster.frontend.dispatcher import Dispatcher
        from moecluster.frontend.routing import RoutingTable
        from moecluster.frontend.server import FrontendService
        from moecluster.frontend.table_watcher import TableWatcher
        from moecluster.models.checkpoint import Checkpoint

        checkpoint = Checkpoint(model)
        self.dispatcher = Dispatcher(RoutingTable(0, {}))
        self.service = FrontendService(checkpoint, self.dispatcher, controller=controller, device=device,
                                       **(settings or {}))
        self.watcher = TableWatcher(controller, self.dispatcher, f"serve-{name}-{uuid.uuid4().hex[:8]}")
        self.watcher.start()
        if not self.watcher.first_table.wait(60):
            raise RuntimeError(f"no routing table from the controller at {controller} within 60s")

    async def _call(self, method: str, request):
        """The service's method on a thread; the call's end (answered, failed, or cancelled: Serve cancels a
        request whose client went away) ends its context, which stops a generation still running."""
        context = _Context()
        try:
            return await asyncio.to_thread(getattr(self.service, method), request, context)
        finally:
            context.end()

    async def __call__(self, http: Request) -> Response:
        method = http.url.path.rstrip("/").rsplit("/", 1)[-1]
        if method not in METHODS or http.method != "POST":
            return Response(f"POST one of {sorted(METHODS)} with a serialized request", status_code=404)
        try:
            request = METHODS[method].FromString(await http.body())
            if method == "GenerateStream":
                return await self._frames(request)
            response = await self._call(method, request)
        except CallFailed as err:
            return Response(f"{err.code.name}: {err.details}", status_code=HTTP_STATUS.get(err.code, 500))
        except Exception as err:  # noqa: BLE001 - a malformed body is the caller's error, said as such
            return Response(f"INVALID_ARGUMENT: {type(err).__name__}: {err}", status_code=400)
        return Response(response.SerializeToString(), media_type="application/x-protobuf")

    async def _frames(self, request: frontend_pb2.GenerateRequest) -> StreamingResponse:
        """GenerateStream as HTTP frames (sdk/http_transport.py); a failure before the first tokens raises
        CallFailed (a plain status). The generator is read on threads, one `next` at a time, and stopped
        through its context: closing it from here could meet a `next` still running."""
        context = _Context()
        chunks = self.service.GenerateStream(request, context)
        first = await asyncio.to_thread(next, chunks, None)

        async def frames():
            chunk = first
            try:
                while chunk is not None:
                    yield frame(CHUNK, chunk.SerializeToString())
                    chunk = await asyncio.to_thread(next, chunks, None)
            except CallFailed as err:
                yield frame(FAILURE, f"{err.code.name}: {err.details}".encode())
            finally:
                context.end()  # done, or the client went away: the generation stops

        return StreamingResponse(frames(), media_type="application/x-moecluster-frames")

    # Serve's gRPC proxy calls these by the proto's method names.
    async def Forward(self, request: frontend_pb2.ForwardRequest) -> frontend_pb2.ForwardResponse:
        return await self._call("Forward", request)

    async def Generate(self, request: frontend_pb2.GenerateRequest) -> frontend_pb2.GenerateResponse:
        return await self._call("Generate", request)

    def GenerateStream(self, request: frontend_pb2.GenerateRequest):
        """A generator: the proxy streams what it yields; closed early, the generation stops."""
        yield from self.service.GenerateStream(request, _Context())

    async def Info(self, request: frontend_pb2.InfoRequest) -> frontend_pb2.InfoResponse:
        return await self._call("Info", request)

    async def Status(self, request: frontend_pb2.StatusRequest) -> frontend_pb2.StatusResponse:
        return await self._call("Status", request)


def start(name: str, model: str, controller: str, *, http_port: int, grpc_port: int | None = None,
          min_replicas: int = 1, max_replicas: int = 4, device: str = "cpu",
          settings: dict[str, int] | None = None, tls: dict[str, str] | None = None) -> str:
    """Runs the application (Serve itself started on 127.0.0.1:http_port if it is not running; one
    Serve serves every cluster of a Ray instance, each under /NAME); returns its HTTP base address.
    A `device` cuda or cuda:N gives each replica a GPU from Ray (which makes it that replica's cuda:0)."""
    grpc_options = None
    if grpc_port:  # Ray binds it on every interface: only where the network allows it
        grpc_options = {"port": grpc_port,
                        "grpc_servicer_functions": ["moecluster.protos.frontend_pb2_grpc.add_FrontendServicer_to_server"]}
    serve.start(http_options={"host": "127.0.0.1", "port": http_port}, grpc_options=grpc_options)
    from ray.serve.context import _get_global_client  # Serve's port is the first application's: ask it

    http = _get_global_client().http_config
    on_gpu = device.startswith("cuda")
    app = MoEFrontend.options(autoscaling_config={
        "min_replicas": min_replicas, "max_replicas": max_replicas, "target_ongoing_requests": 4,
    }, ray_actor_options={"num_cpus": 0, "num_gpus": 1 if on_gpu else 0}).bind(
        model, controller, name, "cuda" if on_gpu else device, settings, tls)
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    return f"http://{http.host}:{http.port}/{name}"


def stop(name: str) -> None:
    serve.delete(name)


def app_builder(args: dict):
    """For `serve deploy` / `serve run` config files: `import_path: moecluster.backends.ray_serve:app_builder`,
    `args: {model: DIR, controller: HOST:PORT, name: NAME, device: cpu|cuda|auto, generate_cache_tokens: N,
    forward_batch_tokens: N}` (the
    controller `moectl up --backend ray` started; with device cuda give the deployment `ray_actor_options:
    {num_gpus: 1}`)."""
    missing = [k for k in ("model", "controller") if k not in args]
    if missing:
        raise ValueError(f"moecluster Serve application: args lack {missing}; give model (checkpoint folder) and "
                         "controller (host:port, from `moectl status -o json`)")
    settings = {k: int(args[k]) for k in ("generate_cache_tokens", "forward_batch_tokens") if k in args}
    return MoEFrontend.bind(args["model"], args["controller"], args.get("name", "moecluster"), args.get("device", "cpu"),
                            settings)
