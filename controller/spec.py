"""What the user wants of a cluster: a value, validated when it is made."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GENERATE_PAGE_TOKENS = 32  # frontend/generation_batcher.py's KV cache page (that module imports transformers)
DRAINED_KEPT = 16  # drained workers that are gone still named, so that a drain asked again finds its own


class ClusterSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("default", pattern=r"^[A-Za-z0-9_-]+$")
    model: str = Field(description="Hugging Face checkpoint folder")
    workers: int = Field(ge=1, description="expert workers in the pool")
    min_replicas: int = Field(1, ge=1, description="copies of every expert, on distinct workers")
    standby_workers: int = Field(0, ge=0, description="spare workers kept started and empty, so that a scale-up "
                                 "skips starting one (where a start is slow: a new pod, a new Ray actor)")
    max_replicas: int | None = Field(None, ge=1, description="cap on copies of a hot expert (default: workers)")
    capacity: int | None = Field(None, ge=1, description="experts one worker may hold (default: 1.5x its even share)")
    policy: Literal["balanced"] = "balanced"
    rebalance_above: float = Field(1.3, gt=1.0, description=(
        "re-place for load when the MoE layers wait this many times longer than with an even split "
        "(and a new placement would cut that by half the margin)"))
    rebalance_min_load: float = Field(50.0, ge=0.0, description="tokens/s below which load is noise, not a reason to move")
    worker_num_cpus: float = Field(1.0, ge=0, description="CPUs a worker asks of its scheduler (Ray, Kubernetes)")
    worker_num_gpus: float = Field(0.0, ge=0, description="GPUs a worker asks of its scheduler")
    worker_device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$",
                               description="where workers keep and compute their experts: cpu, cuda, cuda:N, or auto "
                               "(a GPU where the worker sees one)")
    frontend_device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$",
                                 description="where frontends run the dense model (embeddings, attention, router): "
                                 "cpu, cuda, cuda:N, or auto")
    worker_batch_tokens: int | None = Field(None, ge=0, description="a worker computes the inference requests for a "
                                            "layer that arrive while it computes as one kernel call of up to this "
                                            "many tokens; 0: each request alone (unset: the worker's default, 2048)")
    worker_compute_threads: int | None = Field(None, ge=1, description="threads a worker computes those calls on "
                                               "(unset: the worker's default, 2)")
    generate_cache_tokens: int | None = Field(None, ge=0, description="frontends decode generations together "
                                              "in one running batch with a KV cache of this many tokens; 0: each "
                                              "request alone (unset: the frontend's default, 4096)")
    forward_batch_tokens: int | None = Field(None, ge=0, description="frontends compute the Forward requests that "
                                             "arrive while they compute others as one forward of up to this many "
                                             "tokens; 0: each request alone (unset: the frontend's default, 2048)")
    api_keys_file: str | None = Field(None, description="frontends serve only clients that send one of the keys in "
                                      "this file (one per line) as `authorization: Bearer KEY` (wire/access.py)")
    tls_cert_file: str | None = Field(None, description="frontends serve TLS with this PEM certificate chain")
    tls_key_file: str | None = Field(None, description="the PEM private key of tls_cert_file")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="custom scheduler resources per worker")
    serve_grpc_port: int | None = Field(None, ge=1, le=65535, description="Ray backend: also serve the frontend "
                                        "through Serve's gRPC proxy on this port (Ray binds it on every interface)")
    snapshot_dir: str | None = Field(None, description="where training snapshots go (and are restored from)")
    snapshot_every_s: float | None = Field(None, gt=0, description="snapshot a training pool this often (needs snapshot_dir)")
    snapshot_keep: int = Field(3, ge=0, description="snapshots kept: the newest N, and the newest holding a trainer's "
                               "state (what a resume needs); 0 keeps all")
    colocate: bool = Field(False, description="co-locate experts that tokens pick together, as frontends report "
                           "them: fewer workers per token, so fewer bytes and RPCs per layer, for expert copies made "
                           "while routing shifts (worth it where the network between frontends and workers is busy)")
    drained: tuple[str, ...] = Field((), description="workers drained out of the pool, oldest first: emptied and "
                                     "stopped before any other goes, and not counted in `workers` (a drain lowers it "
                                     "in the same write, so a controller restarted mid-drain goes on with the same one)")

    @model_validator(mode="after")
    def _replicas_fit(self) -> "ClusterSpec":
        if self.min_replicas > self.workers:
            raise ValueError(f"min_replicas ({self.min_replicas}) cannot exceed workers ({self.workers}): "
                             "copies of one expert live on distinct workers")
        if self.snapshot_every_s is not None and not self.snapshot_dir:
            raise ValueError("snapshot_every_s needs snapshot_dir: the folder periodic snapshots go to")
        if self.generate_cache_tokens and self.generate_cache_tokens < GENERATE_PAGE_TOKENS:
            raise ValueError(f"generate_cache_tokens ({self.generate_cache_tokens}) is below one page of the KV cache "
                             f"({GENERATE_PAGE_TOKENS} tokens); 0 decodes each generation alone")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self

    def worker_settings(self) -> dict[str, int]:
        """What this spec sets of a worker's serving, as WorkerServer's keywords (unset: the worker's defaults)."""
        return _set({"batch_tokens": self.worker_batch_tokens, "compute_threads": self.worker_compute_threads})

    def frontend_settings(self) -> dict[str, int]:
        """What this spec sets of a frontend's serving, as FrontendServer's keywords."""
        return _set({"generate_cache_tokens": self.generate_cache_tokens,
                     "forward_batch_tokens": self.forward_batch_tokens})

    def frontend_access(self) -> dict[str, str]:
        """Who may call a frontend and over what (files it reads), as FrontendServer's keywords."""
        return _set({"api_keys": self.api_keys_file, "tls_cert": self.tls_cert_file, "tls_key": self.tls_key_file})

    def capacity_for(self, num_experts: int, workers: int | None = None) -> int:
        """Experts per worker: the spec's, or 1.5x an even share of num_experts * min_replicas (room for hot copies)."""
        if self.capacity is not None:
            return self.capacity
        share = num_experts * self.min_replicas / max(1, workers or self.workers)
        return max(1, math.ceil(1.5 * share))

    def draining(self, worker_id: str, *, shrink: bool, present: Collection[str]) -> "ClusterSpec":
        """This spec less `worker_id`, in one write: `worker_id` named in `drained`, and a worker fewer if
        `shrink` (otherwise it is replaced: a drained spare, or a replace). Of the drained workers no longer
        `present`, the oldest are forgotten beyond DRAINED_KEPT."""
        names = [*(w for w in self.drained if w != worker_id), worker_id]
        while len(names) > DRAINED_KEPT and (gone := next((w for w in names if w not in present), None)):
            names.remove(gone)
        return self.model_copy(update={"workers": self.workers - shrink, "drained": tuple(names)})


def as_flags(settings: dict[str, int | str]) -> list[str]:
    """Keywords as the process's command-line flags: {"batch_tokens": 0} -> ["--batch-tokens", "0"]."""
    return [part for key, value in settings.items() for part in ("--" + key.replace("_", "-"), str(value))]


def _set(values: dict) -> dict:
    return {key: value for key, value in values.items() if value is not None}
