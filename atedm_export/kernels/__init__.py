"""The map layer's GPU kernels (Triton) and the torch custom ops that run them.

``triton_kernels.py`` holds the kernel sources and their launchers (the only module that imports triton);
``ops.py`` registers them as ``torch.ops.atedm.*`` with fake implementations; ``outputs.py`` gives each op's
outputs from its inputs (the one table the fakes, the launchers and the graph nodes read); ``runnable.py`` says
where they can run; ``aot.py`` compiles every kernel ahead of time for a GPU target, with no GPU (what CI checks,
and what a TensorRT plugin would embed); ``costs.py`` their FLOPs and bytes for the cost model.
"""

from __future__ import annotations

from .runnable import require_runnable, why_not

__all__ = ["require_runnable", "why_not"]
