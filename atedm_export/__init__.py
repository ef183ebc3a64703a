"""atedm-export: AT-EDM token pruning baked into static SDXL UNet graphs, ONNX and TensorRT engines."""

from .pruning import PruneOptions, StagePlan, apply_atedm, remove_atedm

__version__ = "0.1.0"

__all__ = ["PruneOptions", "StagePlan", "__version__", "apply_atedm", "remove_atedm"]
