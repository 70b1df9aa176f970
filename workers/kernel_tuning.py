"""Launch parameters of the Triton expert kernels, as data.

A config is a dict:
  BLOCK_M                      rows per M-block (the routing pads each expert to it)
  gate_up, down                forward grouped GEMMs
  grad_act, grad_x             backward grouped GEMMs (dy @ down, dh @ gate_up)
        each {BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages}, plus optionally TMA (true: the
        weights, and rows already in sorted order, load through TMA descriptors) and, for
        gate_up and grad_act, GATHER (true, with TMA: x or dy is first gathered into sorted-row
        order, so its tiles load through TMA too)
  grad_w                       weight-gradient kernels {BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages},
                               plus optionally backend "grouped_mm": torch._grouped_mm (CUTLASS)
                               computes them instead
  decode                       null, or {BLOCK_N, BLOCK_K, num_warps, num_stages, DOWN_BLOCK_N,
                               DOWN_BLOCK_K, down_warps}: inference on few tokens skips the routing and
                               runs two GEMV kernels (gate_up per assignment; down with the combine)
  backend                      "triton" or "grouped_mm": which path `fused_experts` takes (forward)

Tuned tables live in `workers/tuned/E{E}-I{I}-H{H}-{dtype}-{GPU name}.json`, one per
expert shape, dtype and GPU, mapping a token count to a config (`bench/tune_kernels_gpu.py`
writes them on a GPU).  A call uses the entry of the nearest token count (by ratio); keys the entry
leaves out, and shapes with no table, fall back to the defaults below.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["TUNED_DIR", "default_config", "device_name", "pick_config", "table_path"]

TUNED_DIR = Path(__file__).with_name("tuned")

_INTERPRETER = {
    "BLOCK_M": 16,
    **{k: dict(BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
       for k in ("gate_up", "down", "grad_act", "grad_x")},
    "grad_w": dict(BLOCK_N=16, BLOCK_K=16, BLOCK_R=16, num_warps=4, num_stages=1),
    "decode": None,
    "backend": "triton",
}


def default_config(num_experts: int, tokens: int, top_k: int | None, dtype: torch.dtype, interpret: bool) -> dict:
    """Untuned defaults: small M-blocks when experts get few rows (decode), big tiles otherwise."""
    if interpret:
        return json.loads(json.dumps(_INTERPRETER))
    rows_per_expert = tokens * (top_k or 2) / max(num_experts, 1)
    wide = dtype != torch.float32  # fp32 tiles take twice the shared memory
    if rows_per_expert <= 32:
        gemm = dict(BLOCK_N=64, BLOCK_K=128 if wide else 64, GROUP_M=1, num_warps=4, num_stages=4 if wide else 3)
        block_m = 16
    else:
        gemm = dict(BLOCK_N=128 if wide else 64, BLOCK_K=64 if wide else 32, GROUP_M=8, num_warps=8 if wide else 4,
                    num_stages=3)
        block_m = 128 if rows_per_expert >= 256 and wide else 64
    gate_up = dict(gemm, BLOCK_N=max(32, gemm["BLOCK_N"] // 2))  # two accumulators (gate and up)
    return {
        "BLOCK_M": block_m,
        "gate_up": gate_up, "down": dict(gemm), "grad_act": dict(gemm), "grad_x": dict(gemm),
        "grad_w": dict(BLOCK_N=128 if wide else 64, BLOCK_K=128 if wide else 64, BLOCK_R=32,
                       num_warps=8 if wide else 4, num_stages=3),
        "decode": None,
        "backend": "triton",
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def table_path(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device_name: str) -> Path:
    """Where the tuned table for this expert shape, dtype and GPU lives."""
    name = f"E{num_experts}-I{inter}-H{hidden}-{_dtype_name(dtype)}-{device_name.replace(' ', '_')}.json"
    return TUNED_DIR / name


@lru_cache(maxsize=None)
def _load(path: Path) -> dict[int, dict] | None:
    if not path.exists():
        return None
    return {int(tokens): cfg for tokens, cfg in json.loads(path.read_text()).items()}


def device_name(device: torch.device) -> str | None:
    """The GPU's name as tables are keyed ("NVIDIA H100 80GB HBM3"), None off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def pick_config(num_experts: int, inter: int, hidden: int, tokens: int, dtype: torch.dtype,
                gpu: str | None, interpret: bool = False, top_k: int | None = None) -> dict:
    """The config for a call on `tokens` tokens on GPU `gpu` (a `device_name`): the tuned
    entry of the nearest token count, completed by the defaults."""
    config = default_config(num_experts, tokens, top_k, dtype, interpret)
    if interpret or gpu is None:
        return config
    table = _load(table_path(num_experts, inter, hidden, dtype, gpu))
    if table:
        tuned = table[min(table, key=lambda m: abs(math.log(m) - math.log(max(tokens, 1))))]
        for key, value in tuned.items():
            config[key] = dict(config.get(key) or {}, **value) if isinstance(value, dict) else value
    return config
