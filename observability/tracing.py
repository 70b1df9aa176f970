"""OpenTelemetry tracing for moecluster: one tracer per module, one SDK provider per process.

Modules take a tracer at import time (`_TRACER = tracer(__name__)`) and open
spans with `start_span(_TRACER, "moe.dispatch", {...})`. Until a process calls
`configure_tracing` the global provider is OpenTelemetry's no-op proxy, and
`start_span` hands back a shared do-nothing context, so an unconfigured process
pays one isinstance check per span.

`configure_tracing(service_name)` installs an SDK TracerProvider (once; later
calls return the same one). It exports nowhere by default; with
MOECLUSTER_TRACE_FILE=/path set, every finished span is appended to that file as
one JSON line (several processes may share the file: each span is one
O_APPEND write).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.util.types import Attributes

TRACE_FILE_ENV = "MOECLUSTER_TRACE_FILE"

_lock = threading.Lock()
_provider: trace.TracerProvider | None = None
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)  # reusable: enter/exit do nothing, yields a non-recording span


def tracer(name: str) -> trace.Tracer:
    """A tracer from the global provider; taken before `configure_tracing` it follows the provider set later."""
    return trace.get_tracer(name)


def tracing_enabled() -> bool:
    """True once some TracerProvider other than the default no-op proxy is installed."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def start_span(tracer_: trace.Tracer, name: str, attributes: Attributes = None):
    """`tracer_.start_as_current_span(name, attributes=...)`, or a free no-op context while tracing is off.

    Either way it is a context manager yielding a span whose `set_attribute(s)` may be called.
    """
    if not tracing_enabled():
        return _NO_SPAN
    return tracer_.start_as_current_span(name, attributes=attributes)


def configure_tracing(service_name: str, *, exporter=None) -> trace.TracerProvider:
    """Installs an SDK TracerProvider for this process, once; returns the provider in use.

    The first call names the service (resource attribute service.name) and, when
    MOECLUSTER_TRACE_FILE is set, exports each span as a JSON line to that file.
    A provider that the hosting program installed itself is kept, not replaced.
    `exporter` (an SDK SpanExporter, e.g. an in-memory one in tests) is attached
    to the provider in use, on this call and any later one.
    """
    global _provider
    with _lock:
        if _provider is None:
            if tracing_enabled():  # someone else configured OpenTelemetry: leave it be
                _provider = trace.get_tracer_provider()
            else:
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider

                provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
                path = os.environ.get(TRACE_FILE_ENV)
                if path:
                    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
                trace.set_tracer_provider(provider)
                _provider = trace.get_tracer_provider()
        if exporter is not None:
            if not hasattr(_provider, "add_span_processor"):
                raise TypeError(f"the installed tracer provider {type(_provider).__name__} takes no span processors")
            _provider.add_span_processor(SimpleSpanProcessor(exporter))
        return _provider


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span to a file as one line of JSON (ReadableSpan.to_json, unindented)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence) -> SpanExportResult:
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            try:
                while data:  # one write in practice: lines from several processes do not interleave
                    data = data[os.write(self._fd, data):]
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


__all__ = ["TRACE_FILE_ENV", "JsonLinesSpanExporter", "configure_tracing", "start_span", "tracer", "tracing_enabled"]
