"""The build folder, owned in one place: its record (``manifest.json``), its layout, a view per shape, its checks
and the one reader and writer. Every other module reads and writes a build through this package."""

from ..errors import ManifestError, ScheduleError, ShapeError
from .checksums import (check_lora, file_entry, lora_entry, manifest_sha256, pipeline_changes, pipeline_info, sha256,
                        check_graph_files, check_file, check_files, check_graph, check_weights)
from .consistency import check_consistent
from .layout import MANIFEST, graph_id, graph_label
from .lineage import check_same_graphs, check_same_model, model_fingerprint, origin
from .record import (FORMAT, EngineInfo, FileEntry, GraphEntry, LoraEntry, Manifest, PipelineFile, PipelineInfo,
                     RefitInfo, ShapeGraphs, TensorEntry)
from .store import parse_manifest, read_manifest, rewrite, tool_versions, write_manifest
from .view import ShapeView, find_view, first_view, view_at, view_for_latent, views

__all__ = [
    "FORMAT", "MANIFEST", "EngineInfo", "FileEntry", "GraphEntry", "LoraEntry", "Manifest", "ManifestError",
    "PipelineFile", "PipelineInfo", "RefitInfo", "ScheduleError", "ShapeError", "ShapeGraphs", "ShapeView",
    "TensorEntry", "check_consistent", "check_lora", "check_same_graphs", "check_same_model", "file_entry",
    "find_view", "first_view", "graph_id", "graph_label", "lora_entry", "manifest_sha256", "model_fingerprint",
    "origin", "parse_manifest", "pipeline_changes", "pipeline_info", "read_manifest", "rewrite", "sha256", "check_graph_files",
    "tool_versions", "check_file", "check_files", "check_graph", "check_weights", "view_at", "view_for_latent", "views",
    "write_manifest",
]
