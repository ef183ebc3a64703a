"""atedm-export: AT-EDM token pruning baked into static Stable Diffusion UNet graphs, ONNX and TensorRT engines.

The method's API is imported on first use, not with the package: the engine builder runs in a process
of its own (``isolated.py``) that needs neither torch nor diffusers, and would otherwise spend seconds
importing them for every engine.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["AtedmOptions", "StagePlan", "__version__", "apply_pruning", "remove_pruning"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import pruning

        return getattr(pruning, name)
    raise AttributeError(f"module 'atedm_export' has no attribute '{name}'")
