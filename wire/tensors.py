"""Tensors on the wire: raw little-endian bytes + dtype + shape.

Decoding is a single `torch.frombuffer` over the received bytes (no per-element
parsing). Every check a peer can fail raises `WireError`, which servers turn
into INVALID_ARGUMENT with the message as it is.
"""

from __future__ import annotations

import sys

import torch
from moecluster.protos import tensor_pb2
from moecluster.wire.wire_error import WireError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform we ship on is little-endian
    raise ImportError("moecluster's wire format is little-endian; this host is big-endian")


def encode(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """(any shape) tensor of a supported dtype -> Tensor message (copies to contiguous CPU bytes)."""
    if tensor.dtype not in NAMES:
        raise WireError(f"dtype {tensor.dtype} cannot travel; supported: {sorted(DTYPES)}")
    cpu = tensor.detach().to("cpu").contiguous()
    # bfloat16 has no numpy type: ship its bytes through an int16 view.
    raw = cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu
    return tensor_pb2.Tensor(dtype=NAMES[cpu.dtype], shape=list(cpu.shape), data=raw.numpy().tobytes())


def decode(message: tensor_pb2.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """Tensor message -> tensor sharing the message's bytes (read-only: clone before writing in place).

    Raises WireError for an unknown dtype, a negative dimension or a byte size
    that does not match the shape.
    """
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise WireError(f"{name}: unknown dtype {message.dtype!r}; supported: {sorted(DTYPES)}")
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{name}: negative dimension in shape {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != numel * itemsize:
        raise WireError(
            f"{name}: {len(message.data)} bytes do not match shape {list(shape)} of {message.dtype} "
            f"({numel * itemsize} bytes expected)"
        )
    if numel == 0:
        try:
            return torch.empty(shape, dtype=dtype)
        except RuntimeError:  # e.g. [2**62, 2**62, 0]: torch cannot even describe it
            raise WireError(f"{name}: shape {list(shape)} is too large to describe") from None
    import warnings

    with warnings.catch_warnings():
        # protobuf bytes are immutable; torch warns that the tensor is not writable.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(message.data, dtype=dtype)
    return flat.view(shape)


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's payload."""
    return tensor.numel() * tensor.element_size()
