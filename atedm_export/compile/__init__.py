"""ONNX → serialized engine, through one small seam over two libraries with the same API.

``tensorrt`` (datacenter GPUs) builds for the GPU it runs on. ``tensorrt-rtx`` (``tensorrt_rtx_bindings``)
builds ahead of time, on any machine including a CPU-only one, for explicit compute capabilities.
Both build strongly typed networks: precision was decided at export, in the graph's tensor types.
"""

from __future__ import annotations

from .api import APIS, EngineUnavailable, TensorRTApi, TensorRTRtxApi
from .library import BuildOptions, EngineBuildError, EngineLibrary, available_libraries, build_isolated, load_library

__all__ = ["APIS", "BuildOptions", "EngineBuildError", "EngineLibrary", "EngineUnavailable", "TensorRTApi",
           "TensorRTRtxApi", "available_libraries", "build_isolated", "load_library"]
