"""``atedm-export bench``: stock eager vs AT-EDM eager vs graphs in each backend, side by side, in one run.

Every graph of the build (baseline and stages) is timed in every backend on the same inputs: warm-up
calls, then ``repeats`` timed calls; medians and the 10th/90th percentiles are reported. The eager
backend's baseline *is* the stock diffusers UNet, so "vs eager" ratios compare with what users run
today; "vs unpruned" ratios compare each stage with the baseline graph in the same backend, beside
the speedup the counted FLOPs predict. The schedule rows weight each stage by its steps (per image).
GPU timings use CUDA events after a synchronize.

Every graph runs in each form its backend has: the eager UNet on SDPA; onnxruntime on the plain graph
(attention unfused) and, where the build has one, on its fused form (``ortfuse.py``: attention as
onnxruntime's kernels); engines as built. Each backend's reference is its fastest baseline, whichever
form that is (on this CPU the plain graph beats onnxruntime's fused kernels): "vs unpruned" is always
against the fastest stock baseline of the same backend, never a slower one. What each backend runs, in which
forms, and whose baseline is the stock UNet, bench reads off the backend's class (``runtime/backends.py``).
"""

from __future__ import annotations

import csv
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import AtedmError
from .buildfolder import ShapeView, check_same_model, first_view, read_manifest, view_at
from .shapes import Shape
from .runtime.backends import Backend, backend_class, backend_type, load_backend


@dataclass(frozen=True)
class Row:
    backend: str
    graph: str
    form: str  # how the backend ran it: sdpa (eager), fused | unfused (onnxruntime), engine
    steps: int  # steps of the spec's run this graph serves (baseline: all)
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    graph_tflops: float
    speedup_vs_eager: float | None  # eager stock UNet median / this median (None: eager not timed)
    speedup_vs_unpruned: float  # the same backend's fastest baseline median / this median
    flops_speedup: float  # baseline FLOPs / this graph's FLOPs


@dataclass(frozen=True)
class ScheduleRow:
    backend: str
    form: str
    seconds_per_image: float  # the whole schedule, one UNet call (batch) per step
    unpruned_seconds_per_image: float
    speedup_vs_unpruned: float
    speedup_vs_eager: float | None
    flops_speedup: float


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0-1) of the samples: one of the measured values, never interpolated."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def time_ms(call: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls after ``warmup`` calls; CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        call()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            call()
            samples.append((time.perf_counter() - tick) * 1e3)
    return samples


def time_calls(backend: Backend, graph: str, feed: dict[str, torch.Tensor], warmup: int, repeats: int) -> list[float]:
    """``time_ms`` of one graph of a backend."""
    return time_ms(lambda: backend.run(graph, feed), backend.device, warmup, repeats)


def run_bench(folder: str | Path, backends: list[str], warmup: int = 1, repeats: int = 5,
              device: str | None = None, progress=None, engine_options: dict | None = None,  # noqa: ANN001
              shape: Shape | None = None) -> dict:
    """Time every graph in every backend; returns the JSON-ready report. ``engine_options`` go to the
    engine backends only (``cuda_graphs``, ``weights``)."""
    return run_benches([Path(folder)], backends, warmup, repeats, device, progress, engine_options, shape)[0]


def _verify(folder: Path, view: ShapeView, backends: list[str]) -> None:
    """The files each backend opens (a missing plan concerns the engine backends only), before any timing."""
    for name in backends:
        backend_class(name, folder, view.manifest).check_build_files(folder, view.manifest)


def _time_build(folder: Path, view: ShapeView, backends: list[str], warmup: int, repeats: int, device: str | None,
                progress=None, engine_options: dict | None = None) -> dict:  # noqa: ANN001
    """Every graph of a checked build, at the shape ``view`` reads, timed in every backend and form: the report."""
    samples: dict[tuple[str, str, str], list[float]] = {}  # (backend, form, graph) → ms
    for name in backends:
        cls = backend_type(name)
        for form in cls.bench_forms(view.manifest):
            options = (engine_options or {}) if cls.takes_engine_options else {}
            backend = load_backend(name, folder, view.manifest, device, **options, **cls.form_options(form)).at(view)
            feed = view.contract.example_feed(device=backend.device)
            for entry in view.graphs():
                if progress:
                    progress(f"{name} ({form}): {entry.name}")
                samples[(name, form, entry.name)] = time_calls(backend, entry.name, feed, warmup, repeats)
                backend.release()
            del backend
    return _report(folder, view, backends, samples, warmup, repeats)


def run_benches(folders: list[Path], backends: list[str], warmup: int = 1, repeats: int = 5, device: str | None = None,
                progress=None, engine_options: dict | None = None,  # noqa: ANN001
                shape: Shape | None = None) -> list[dict]:
    """``run_bench`` of several builds of one model (AT-EDM and ToMe, say) one after the other, in one run: each
    report's ratios are against its own baseline graph, which is the same graph for builds of one model, timed
    again beside each (its spread between reports shows the machine's noise). ``shape``: the builds' graphs at
    that shape (``buildfolder.view_at``); their first shape by default."""
    if repeats < 1 or warmup < 0:
        raise AtedmError(f"need --repeats >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    folders = [Path(f) for f in folders]
    manifests = [read_manifest(f, verify=False) for f in folders]
    shapes = [view_at(m, shape) if shape is not None else first_view(m) for m in manifests]
    check_same_model(folders, shapes, "bench")
    for folder, view in zip(folders, shapes):  # every build's files, each hashed once, before any timing
        _verify(folder, view, backends)
    return [_time_build(f, view, backends, warmup, repeats, device, progress, engine_options)
            for f, view in zip(folders, shapes)]


def side_by_side(reports: list[dict]) -> list[dict]:
    """The whole-schedule rows of several builds' reports, each with its build, method and schedule."""
    return [{"build": r["build"], "method": r["method"], "schedule_name": r["schedule_name"], **row}
            for r in reports for row in r["schedule"]]


def _report(folder: Path, view: ShapeView, backends: list[str], samples: dict, warmup: int, repeats: int) -> dict:
    spec = view.graph_spec
    median = {k: statistics.median(v) for k, v in samples.items()}
    base_flops = view.baseline.graph_tflops
    classes = {name: backend_type(name) for name in backends}
    stock = next(((name, cls.stock_form) for name, cls in classes.items() if cls.stock_form), None)
    eager_ref = median.get((*stock, "baseline")) if stock else None  # the stock diffusers UNet
    rows, schedule, references = [], [], {}
    for name, cls in classes.items():
        ran = cls.bench_forms(view.manifest)
        best = min(ran, key=lambda form: median[(name, form, "baseline")])
        unpruned = median[(name, best, "baseline")]
        references[name] = {"form": best, "median_ms": unpruned, "what": cls.reference(best, ran)}
        for form in ran:
            for entry in view.graphs():
                key = (name, form, entry.name)
                m = median[key]
                steps = spec.steps if entry.name == "baseline" else entry.step_count
                rows.append(Row(
                    name, entry.name, form, steps, m, percentile(samples[key], 0.1), percentile(samples[key], 0.9),
                    min(samples[key]), entry.graph_tflops, (eager_ref / m) if eager_ref else None, unpruned / m,
                    base_flops / entry.graph_tflops,
                ))
            if view.manifest.complete:
                per_image = sum(median[(name, form, s.name)] * s.step_count for s in view.stages) / 1e3
                flops = sum(s.graph_tflops * s.step_count for s in view.stages)
                unpruned_image = unpruned * spec.steps / 1e3
                schedule.append(ScheduleRow(
                    name, form, per_image, unpruned_image, unpruned_image / per_image,
                    (eager_ref * spec.steps / 1e3 / per_image) if eager_ref else None,
                    base_flops * spec.steps / flops,
                ))
    return {
        "build": str(folder),
        "spec": spec.name,
        "method": spec.method,
        "schedule_name": spec.dsap.name,
        "precision": spec.precision,
        "batch": spec.batch,
        "resolution": [spec.width, spec.height],
        "shape": view.shape.key,
        "steps": spec.steps,
        "machine": {"processor": platform.processor() or platform.machine(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "warmup": warmup,
        "repeats": repeats,
        "backends": backends,
        "references": references,
        "rows": [asdict(r) for r in rows],
        "schedule": [asdict(s) for s in schedule],
        "samples_ms": {f"{b}/{f}/{g}": v for (b, f, g), v in samples.items()},
    }


def write_csv(reports: list[dict], path: Path) -> None:
    """One row per build, backend, form and graph."""
    rows = [{"build": r["build"], "method": r["method"], **row} for r in reports for row in r["rows"]]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_plot(report: dict, path: Path) -> None:
    """Bar chart: median latency per graph, grouped by backend, with measured vs FLOPs-predicted speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = list(dict.fromkeys(r["graph"] for r in report["rows"]))
    series = list(dict.fromkeys((r["backend"], r["form"]) for r in report["rows"]))
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(graphs) * max(1, len(series)) / 2, 4.2))
    width = 0.8 / len(series)
    for i, (name, form) in enumerate(series):
        rows = {r["graph"]: r for r in report["rows"] if (r["backend"], r["form"]) == (name, form)}
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(graphs))]
        bars = ax.bar(xs, [rows[g]["median_ms"] for g in graphs], width, label=f"{name} ({form})",
                      yerr=[[rows[g]["median_ms"] - rows[g]["p10_ms"] for g in graphs],
                            [rows[g]["p90_ms"] - rows[g]["median_ms"] for g in graphs]], capsize=3)
        for bar, g in zip(bars, graphs):
            if g != "baseline":
                _annotate(ax, bar, rows[g], rows[g]["p90_ms"])
    ax.set_xticks(range(len(graphs)), graphs)
    ax.set_ylabel("median latency per UNet call (ms)")
    _save(fig, ax, path, f"{report['spec']}: {report['resolution'][0]}x{report['resolution'][1]}, "
                         f"batch {report['batch']}, {report['precision']}")


def _annotate(ax, bar, row: dict, top: float) -> None:  # noqa: ANN001 - matplotlib axes and bar
    """A bar's measured speedup vs the fastest unpruned, and what the FLOPs predict, above ``top``."""
    ax.annotate(f"{row['speedup_vs_unpruned']:.2f}×\n(FLOPs {row['flops_speedup']:.2f}×)",
                (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom", fontsize=7,
                xytext=(0, 2), textcoords="offset points")


def write_side_by_side_plot(reports: list[dict], path: Path) -> None:
    """Bar chart of several builds: seconds per image over the whole schedule, per backend and form, with the
    unpruned reference and each build's measured and FLOPs-predicted speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = side_by_side(reports)
    series = list(dict.fromkeys((r["backend"], r["form"]) for r in rows))
    labels = ["unpruned"] + [f"{Path(r['build']).name}\n({r['method']})" for r in reports]
    fig, ax = plt.subplots(figsize=(2.5 + 1.5 * len(labels) * max(1, len(series)) / 2, 4.2))
    width = 0.8 / max(1, len(series))
    for i, (name, form) in enumerate(series):
        mine = [r for r in rows if (r["backend"], r["form"]) == (name, form)]
        values = [min(r["unpruned_seconds_per_image"] for r in mine)] + [r["seconds_per_image"] for r in mine]
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(values))]
        bars = ax.bar(xs, values, width, label=f"{name} ({form})")
        for bar, r in zip(bars[1:], mine):
            _annotate(ax, bar, r, bar.get_height())
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("seconds per image (whole schedule)")
    first = reports[0]
    _save(fig, ax, path, f"{first['resolution'][0]}x{first['resolution'][1]}, batch {first['batch']}, "
                         f"{first['precision']}, {first['steps']} steps")


def _save(fig, ax, path: Path, title: str) -> None:  # noqa: ANN001 - matplotlib figure and axes
    """Title, legend and a tight layout, written to ``path``, the figure closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.18)  # room for the annotations above the tallest bar
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
