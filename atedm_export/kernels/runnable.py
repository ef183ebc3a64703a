"""Where the map layer's kernels can run, decided before any work, and said in one line where they cannot."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from ..errors import KernelUnavailable


def interpreting() -> bool:
    """Triton's interpreter is on: ``@triton.jit`` reads ``TRITON_INTERPRET`` when the kernels are defined."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


#: Whether OpenAI's triton can be imported: read once, a constant (``torch.compile`` traces the checks that read it).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def why_not(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` now, or None where they can (``meta``: their fake implementations)."""
    if device.type == "meta":
        return None
    if not TRITON_INSTALLED:
        return "map_impl 'kernels' needs OpenAI's triton package (pip install 'atedm-export[kernels]'); use map_impl 'explicit'"
    if device.type == "cuda" or interpreting():
        return None
    return (f"map_impl 'kernels' runs on CUDA tensors, or on CPU tensors in Triton's interpreter (set TRITON_INTERPRET=1 "
            f"before Python starts); got {device.type} tensors: use map_impl 'auto' or 'explicit'")


def require_runnable(device: torch.device) -> None:
    """Raise ``KernelUnavailable`` (one line) where the kernels cannot run on ``device``."""
    reason = why_not(device)
    if reason:
        raise KernelUnavailable(reason)


def auto_takes_kernels(device: torch.device) -> bool:
    """``map_impl: auto``'s choice on ``device``: the kernels on CUDA where triton is installed. On CUDA without it,
    the explicit path, with one warning: it runs, many times slower than the kernels would."""
    if device.type != "cuda":
        return False
    if not TRITON_INSTALLED:
        warnings.warn("map_impl 'auto' on CUDA without OpenAI's triton: the map layer runs as torch ops, many times "
                      "slower; pip install 'atedm-export[kernels]'", RuntimeWarning, stacklevel=3)
        return False
    return True
