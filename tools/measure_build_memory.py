"""Peak resident memory of each phase of a build (export, check, engine build), as a ratio to the weights.

A benchmark, not a test: run it after a change to export or compile to see a memory regression.

    .venv/bin/python tools/measure_build_memory.py tiny-sdxl --backend tensorrt-rtx --target sm89
    .venv/bin/python tools/measure_build_memory.py graphs/sdxl-base-1024.yaml --backend tensorrt-rtx --target sm89 \
        --out /tmp/sdxl --json docs/measurements/sdxl-1024-fp16.json

The build runs in this process through the same ``build()`` the CLI calls. At every progress event the
kernel's own peak-RSS counter (``VmHWM``) is read and reset (``/proc/self/clear_refs``), so each phase
gets the exact peak it reached, not a sampled one. The export and each engine build run in a process of
their own (``isolated.py``), which reports its own peak (``VmHWM``); the manifest keeps them as ``export_peak_rss`` and ``compile_peak_rss``. A phase's peak is the
larger of its child's and the build process's; the whole run's peak is the largest of all phases. Resident bytes include pages mapped from files (the engine builder maps the
weights file), which the kernel can drop under pressure; a sampler thread (every 0.1 s) also records the
peak of anonymous memory alone (``RssAnon``), the part that can only be swapped or killed. Linux only.
The UNet's weight bytes are counted on the ``meta`` device.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

from atedm_export.build import BuildRequest, build
from atedm_export.models import build_unet, unet_config
from atedm_export.spec import GraphSpec, load_spec

GB = 1e9
PHASES = {"exported": "export", "checked": "check", "engine": "engine build"}


def peak_rss() -> int:
    """This process's peak resident bytes since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class AnonSampler(threading.Thread):
    """Samples ``RssAnon`` and keeps the largest value since the last ``take()``."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0

    def run(self) -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(self.interval)

    def take(self) -> int:
        peak, self.peak = self.peak, 0
        return peak


def weight_bytes(spec: GraphSpec) -> int:
    """The UNet's weights at the spec's precision, counted on the ``meta`` device (nothing allocated)."""
    unet = build_unet(unet_config(spec.model), device="meta")
    return sum(p.numel() for p in unet.parameters()) * torch.finfo(spec.dtype).bits // 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--out", type=Path, default=Path("build/memory"), help="build folder (replaced)")
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--target", default="", help="e.g. sm89 (tensorrt-rtx)")
    parser.add_argument("--precision")
    parser.add_argument("--stages", default="", help="comma-separated subset of the schedule's stages")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    if args.precision:
        spec = spec.model_copy(update={"precision": args.precision})
    weights, precision = weight_bytes(spec), spec.precision
    rows: list[dict] = []
    start = time.perf_counter()
    phase_start = start

    def progress(graph: str, event: str, seconds: float | None) -> None:
        nonlocal phase_start
        phase = next((name for word, name in PHASES.items() if event.startswith(word)), None)
        if phase is None:
            return  # an announcement ("compiling with …"), not the end of a phase
        now = time.perf_counter()
        here, anon = peak_rss(), sampler.take()
        child = next((int(float(event.split(f"{who} peak ")[1].split()[0]) * GB)
                      for who in ("exporter", "builder") if f"{who} peak " in event), 0)
        peak = max(here, child)
        rows.append({"graph": graph, "phase": phase, "seconds": round(seconds if seconds is not None else now - phase_start, 1),
                     "peak_rss_gb": round(peak / GB, 3), "ratio_to_weights": round(peak / weights, 3),
                     "child_peak_gb": round(child / GB, 3) if child else None,
                     "build_process_peak_gb": round(here / GB, 3), "build_process_anon_gb": round(anon / GB, 3)})
        print(f"{now - start:8.1f}s  {graph:<10} {phase:<13} {rows[-1]['seconds']:8.1f}s  "
              f"peak {peak / GB:6.2f} GB  = {peak / weights:5.2f}x the weights  "
              f"({'its process ' + format(child / GB, '.2f') + ' GB, ' if child else ''}"
              f"build process {here / GB:.2f} GB, of which anonymous {anon / GB:.2f} GB)", flush=True)
        reset_peak()
        phase_start = now

    targets = tuple(t for t in args.target.split(",") if t)
    stages = tuple(s for s in args.stages.split(",") if s)
    print(f"{spec.name}: {spec.model} {spec.width}x{spec.height} {precision}, UNet weights {weights / GB:.3f} GB; "
          f"backend {args.backend} {args.target}".rstrip(), flush=True)
    sampler = AnonSampler()
    sampler.start()
    reset_peak()
    manifest = build(BuildRequest(spec, args.out, args.backend, targets, stages, force=True), progress)
    overall = max(row["peak_rss_gb"] for row in rows) * GB  # resets make ru_maxrss cover the last phase only
    on_disk = sum(f.bytes for f in manifest.files())
    graphs = manifest.weights.bytes + sum({e.onnx.path: e.onnx.bytes for e in manifest.all_graphs()}.values())
    summary = {
        "spec": spec.name, "precision": precision, "backend": args.backend, "targets": list(targets),
        "weight_bytes": weights, "peak_rss_gb": round(overall / GB, 3), "ratio_to_weights": round(overall / weights, 3),
        "graphs_on_disk_gb": round(graphs / GB, 3), "graphs_ratio_to_weights": round(graphs / weights, 3),
        "total_on_disk_gb": round(on_disk / GB, 3), "wall_seconds": round(time.perf_counter() - start, 1),
        "phases": rows,
    }
    print(f"whole build: peak {overall / GB:.2f} GB = {overall / weights:.2f}x the weights; graphs on disk "
          f"{graphs / GB:.3f} GB = {graphs / weights:.3f}x; everything {on_disk / GB:.3f} GB; "
          f"{summary['wall_seconds']:.0f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
