"""Run a build: backends (eager, onnxruntime, TensorRT) and ``StagedUNet``, the drop-in for ``pipe.unet``."""

from .backends import Backend, load_backend
from .staged import ScheduleError, StagedUNet

__all__ = ["Backend", "ScheduleError", "StagedUNet", "load_backend"]
