"""Which device a process computes on (a worker its experts, a frontend or trainer the dense model),
checked before anything is loaded."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (the first GPU where torch sees one, else the CPU) -> a device
    this process can use; ValueError that says why not."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: models run on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPUs are visible")
    return device
