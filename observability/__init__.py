"""Observability: OpenTelemetry spans and Prometheus metrics, shared by every moecluster process.

Imports nothing else from moecluster, so any layer may use it.
"""

from moecluster.observability.prometheus import Registry, frontend_metrics, serve_metrics, worker_metrics
from moecluster.observability.tracing import TRACE_FILE_ENV, configure_tracing, start_span, tracer

__all__ = ["Registry", "TRACE_FILE_ENV", "configure_tracing", "frontend_metrics", "serve_metrics", "start_span",
           "tracer", "worker_metrics"]
