"""One source for the compute device and for dtype names.

Every module asks :func:`use_cuda` / :func:`current_device` instead of calling
``torch.cuda.is_available()`` itself, so one setting decides where a process runs:

- ``LONGSKY_DEVICE=cpu`` runs on CPU (megatron-core through the CPU compatibility layer)
  even where CUDA is present, and keeps Transformer Engine and apex out of the process
  (:func:`hide_gpu_extensions`, applied when the package is imported): megatron-core picks
  TE's CUDA-only fused Adam, norms and kernels as soon as TE imports. The CPU test suite
  sets it so it behaves the same on a GPU machine as on the CPU machines it is written for;
- ``LONGSKY_DEVICE=cuda`` requires CUDA (an error without it);
- unset (or ``auto``): CUDA when torch sees a device, else CPU.

Dtype names in configs (``float32``, ``bfloat16``, ``float16``) map to torch dtypes through
:data:`DTYPES` only.
"""

from __future__ import annotations

import os

import torch

from megatron_longsky.runtime.gpu_extensions import DEVICE_ENV, GPU_EXTENSIONS, hide_gpu_extensions  # noqa: F401

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str, where: str = "dtype") -> torch.dtype:
    """``'bfloat16'`` -> ``torch.bfloat16``; an unknown name is an error naming ``where``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{where}={name!r} is not one of {list(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'`` (the inverse of :func:`dtype_from_name`)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not one of {list(DTYPES.values())}")


# What megatron-core imports opportunistically and then uses on CUDA tensors only.
def requested_device() -> str:
    """'auto', 'cpu' or 'cuda', from ``LONGSKY_DEVICE``."""
    choice = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={choice!r} is not one of auto, cpu, cuda")
    return choice


def use_cuda() -> bool:
    """Whether this process computes on a CUDA device."""
    choice = requested_device()
    if choice == "cpu":
        return False
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise RuntimeError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device")
    return available


def current_device() -> torch.device:
    """The device this process computes on (its CUDA device after ``torch.cuda.set_device``)."""
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
