"""onnxruntime's own profiler on a build's graphs: kernel time per op class, to check the cost model by.

    python tools/onnxruntime_profile.py BUILD --out profile/

Each graph of BUILD runs once in each form the build has (its onnxruntime-fused form and the plain
graph) with onnxruntime's profiler on, with the session options the onnxruntime backend uses on a CPU.
Kernel times are summed by the classes of ``costmodel.py`` (MatMul/Gemm, Conv, fused attention, the
rest) and written to ``profile.json`` beside the profiler's own traces.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atedm_export.buildfolder import first_view, read_manifest  # noqa: E402

CLASSES = {"MatMul": "matmul", "Gemm": "matmul", "Conv": "conv", "Attention": "attention",
           "MultiHeadAttention": "attention"}


def profile(path: Path, feed: dict, prefix: Path) -> dict:
    """One call of the graph at ``path``; its wall time and kernel seconds per op class."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tick = time.perf_counter()
    session.run(None, feed)
    wall = time.perf_counter() - tick
    by_class: collections.Counter = collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_class[CLASSES.get(event["args"]["op_name"], "memory")] += event["dur"] / 1e6
    return {"wall_s": wall, "kernel_s_by_class": dict(by_class)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--out", type=Path, default=Path("profile"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = first_view(read_manifest(args.build))
    feed = {name: tensor.numpy() for name, tensor in manifest.contract.example_feed(seed=1).items()}
    result = {}
    for entry in manifest.graphs():
        forms = {"plain": entry.onnx, **({"fused": entry.ort_onnx} if entry.ort_onnx else {})}
        for form, file in forms.items():
            key = f"{entry.name}-{form}"
            result[key] = profile(args.build / file.path, feed, args.out / key)
            print(key, json.dumps(result[key]), flush=True)
    (args.out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
