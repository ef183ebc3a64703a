"""Run a build: backends (eager, onnxruntime, TensorRT) and ``StagedUNet``, the drop-in for ``pipe.unet``."""

from .backends import BACKEND_NAMES, Backend, load_backend
from .staged import ScheduleError, StagedUNet

__all__ = ["BACKEND_NAMES", "Backend", "ScheduleError", "StagedUNet", "load_backend"]
