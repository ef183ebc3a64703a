"""``atedm-export``: the command-line front of the toolchain (click group, rich output).

User errors (``AtedmError``) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # torchvision-missing notices on every pipeline import
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # dtype notices on single-file loads that ask nothing of the user

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import AtedmError
from .registry import BUILD_LIBRARIES, COST_DEVICES, DEPLOY_VARIANTS, ENGINE_LIBRARIES, ENGINE_WEIGHTS, PRECISION_NAMES, RUNTIME_BACKENDS

# Rich wraps at 80 columns when output is not a terminal; tables of figures need more.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
out = Console(width=None if sys.stdout.isatty() else 140)


def _say(label: str, style: str, text: str, where: Console | None = None) -> None:
    """``label`` in ``style``, then ``text`` exactly as given: user text (paths, errors naming extras like
    ``atedm-export[triton]``) is never read as console markup."""
    (where or console).print(Text.assemble((label, style), " ", text), highlight=False, soft_wrap=True)


def _progress_line(start: float, name: str, width: int, event: str, seconds: float | None = None) -> None:
    """One line of a long job's progress: elapsed time, what it is working on, what happened."""
    took = "" if seconds is None else f" ({seconds:.1f}s)"
    console.print(Text.assemble((f"{time.perf_counter() - start:7.1f}s", "dim"), "  ", (f"{name:<{width}}", "bold"),
                                " ", event, (took, "dim")), highlight=False)


@contextlib.contextmanager
def _progress(what: str, width: int) -> Iterator[Callable[[str, str, float | None], None]]:
    """A status line while a long job runs, and one printed line per event of it (``_progress_line``)."""
    start = time.perf_counter()
    with console.status(f"{what}…") as status:
        def progress(name: str, event: str, seconds: float | None) -> None:
            _progress_line(start, name, width, event, seconds)
            status.update(Text(f"{name}: {event}…"))

        yield progress


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``kill``, ``timeout``, CI runners and ``docker stop`` send), raised where the program is, so
    the same ``finally`` blocks that clean up after Ctrl-C run: staging folders and locks go, children die."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` for the command's duration (main thread only: elsewhere Python refuses
    handlers); the previous handler comes back after, so an embedding process keeps its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Group(click.Group):
    """Every way a command can fail on the user's input ends as one ``error:`` line, with no traceback.

    - ``AtedmError``: our own checks (exit 2).
    - click's usage errors (a value out of range, an unknown option or command): click's own message on one
      line, with the ``--help`` hint (exit 2), instead of its four-line usage block.
    - ``OSError`` naming a file (a full disk, a read-only folder, a name too long): that file and the reason.
    - Ctrl-C and SIGTERM: ``interrupted:`` (exit 130, or 128 + the signal), after the cleanup ran.
    Anything else is a bug and keeps its traceback.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            with _sigterm_as_interrupt():
                result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else self.name
            _say("error:", "bold red", f"{_one_line(exc.format_message())} (see '{where} --help')")
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _say("error:", "bold red", _one_line(exc.format_message()))
            sys.exit(exc.exit_code)
        except click.Abort:
            _say("interrupted:", "bold red", "nothing was left behind")
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AtedmError as exc:
            _say("error:", "bold red", _one_line(str(exc)))
            sys.exit(2)
        except OSError as exc:
            if exc.filename is None:
                raise
            _say("error:", "bold red", f"{exc.filename}: {exc.strerror or exc}")
            sys.exit(2)
        except Terminated as exc:
            _say("interrupted:", "bold red", f"{exc} received; nothing was left behind")
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            _say("interrupted:", "bold red", "nothing was left behind")
            sys.exit(130)


class FiniteFloat(click.FloatRange):
    """A float option that refuses NaN and infinities: ``--guidance nan`` would draw without guidance."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class TorchDevice(click.ParamType):
    """``cpu``, ``cuda`` or ``cuda:N``, checked when parsed: a typo fails before any model is loaded."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            self.fail(f"'{value}' is not a torch device; expected cpu, cuda or cuda:N", param, ctx)
        if device.type not in ("cpu", "cuda"):
            self.fail(f"'{value}': the backends run on cpu or cuda, not {device.type}", param, ctx)
        if device.type == "cuda" and not torch.cuda.is_available():
            self.fail(f"'{value}': torch sees no CUDA GPU on this machine", param, ctx)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            self.fail(f"'{value}': this machine has {torch.cuda.device_count()} CUDA GPU(s)", param, ctx)
        return str(device)


#: Seeds: what ``torch.Generator.manual_seed`` takes (a 64-bit unsigned integer).
SEED = click.IntRange(0, 2**64 - 1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="atedm-export")
def main() -> None:
    """Bake AT-EDM token pruning into static Stable Diffusion UNet graphs and TensorRT engines."""


@main.command()
@click.argument("specs", nargs=-1, required=True)
@click.option("--schedule", help="DSAP schedule instead of the spec's: a preset (paper, uniform-63, dagger, none) or a "
                                 "YAML file.")
@click.option("--prune-point", type=click.Choice(["attn1", "layer"]),
              help="Prune right after the first self-attention (attn1) or after the first layer (layer, the paper's "
                   "wording) instead of the spec's choice.")
@click.option("--map-batch", type=click.Choice(["head", "all"]),
              help="The exported map layer's per-head maps one head at a time (head) or in one batched product (all: "
                   "fewer ops, heads times the memory) instead of the spec's choice.")
@click.option("--precision", type=click.Choice(PRECISION_NAMES), help="Override the spec's precision (what --device prices).")
@click.option("--device", "devices", multiple=True, type=click.Choice(COST_DEVICES, case_sensitive=False),
              help="Predict each graph's time on this device (repeatable): the cost model's speedup of each stage "
                   "and of the schedule vs the fused baseline, and the map layer's share.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def flops(specs: tuple[str, ...], schedule: str | None, prune_point: str | None, map_batch: str | None,
          precision: str | None, devices: tuple[str, ...], as_json: bool) -> None:
    """FLOPs per image-step of each DSAP stage and the baseline, counted on the patched UNet.

    SPECS are graph spec YAML files or built-in spec names (sdxl-base-1024, sdxl-base-1024-tome, sd15, sd21,
    sdxl-refiner, ssd-1b, tiny-sdxl, ...). A spec with several shapes is counted at each. Several specs (AT-EDM
    and ToMe, say) or shapes end with one table of their budgets side by side.
    """
    from .costmodel import device
    from .flops import flops_report
    from .spec import load_spec

    graph_specs = [load_spec(s).with_schedule(schedule).with_prune_point(prune_point).with_map_batch(map_batch)
                   for s in specs]
    if precision:
        graph_specs = [g.model_copy(update={"precision": precision}) for g in graph_specs]
    # a spec with several shapes: each shape's figures (a keep count is per shape), never the first one's alone
    graph_specs = [g.at(shape) for g in graph_specs for shape in g.shape_list]
    reports = [flops_report(g, tuple(device(d) for d in dict.fromkeys(devices))) for g in graph_specs]
    if as_json:
        data = [r.to_json() for r in reports]
        click.echo(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        return
    for report in reports:
        _print_flops(report)
    if len(reports) > 1:
        out.print(_budget_table(reports))


def _print_flops(report) -> None:  # noqa: ANN001 - flops.FlopsReport
    scale, unit = (1.0, "TFLOPs") if report.baseline_tflops >= 0.1 else (1e3, "GFLOPs")
    from .pruning.methods import summary_of

    table = Table(title=Text(f"{report.spec}: {report.model} at {report.width}x{report.height}, "
                             f"{report.steps} steps, method '{report.method}', schedule '{report.schedule}'"),
                  caption=Text(summary_of(report.method)))
    for column in ("stage", "steps", f"{unit} / image-step", "saving", "pruned blocks"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    blocks = len(report.tokens)
    table.add_row("baseline", "-", f"{report.baseline_tflops * scale:.3f}", "-", f"0/{blocks}")
    for s in report.stages:
        pruned = sum(k < report.tokens[n] for n, k in s.keep.items())
        steps = f"{s.steps[0]}-{s.steps[1] - 1}" if s.num_steps else "(none)"
        table.add_row(s.name, steps, f"{s.tflops * scale:.3f}", f"{s.saving:.1%}", f"{pruned}/{blocks}")
    table.add_section()
    table.add_row("schedule", f"{report.steps}", f"{report.schedule_tflops * scale:.3f}",
                  f"{report.schedule_saving:.1%}", "")
    out.print(table)
    out.print(_keep_table(report.tokens, {s.name: s.keep for s in report.stages}))
    for prediction in report.predictions:
        out.print(_prediction_table(prediction, report.batch, report.precision, report.map_batch))


def _budget_table(reports: list) -> Table:
    """The specs' budgets side by side: what "at the same FLOPs" is read from."""
    scale, unit = (1.0, "TFLOPs") if min(r.baseline_tflops for r in reports) >= 0.1 else (1e3, "GFLOPs")
    table = Table(title="budgets side by side (per image-step, averaged over each schedule's steps)")
    for column in ("spec", "method", "schedule", "resolution", f"baseline {unit}", f"schedule {unit}", "saving"):
        table.add_column(column, justify="left" if column in ("spec", "method", "schedule") else "right")
    for r in reports:
        table.add_row(Text(r.spec), r.method, Text(r.schedule), f"{r.width}x{r.height}",
                      f"{r.baseline_tflops * scale:.3f}", f"{r.schedule_tflops * scale:.3f}", f"{r.schedule_saving:.1%}")
    return table


def _prediction_table(prediction, batch: int, precision: str,  # noqa: ANN001 - flops.DevicePrediction
                      map_batch: str | None = None) -> Table:
    """One device: each graph's predicted time per call, its speedup vs the fused baseline, the map layer's share;
    for AT-EDM also the speedup with the map layer on its kernels (what PyTorch runs on a GPU). ``map_batch``: the
    portable form's (``AtedmOptions.map_batch``), named in the caption."""
    from .pruning.options import MAP_BATCHES

    dev = prediction.device
    kernels = bool(prediction.kernel_stages)
    table = Table(title=Text(f"predicted on {dev.name} ({dev.tflops:.1f} TFLOP/s, fp32 {dev.fp32_tflops:.1f}, "
                             f"{dev.bandwidth_gbs:,.0f} GB/s, {dev.launch_us:.1f} µs a kernel; batch {batch}, "
                             f"{precision}; attention fused everywhere but the map layer)"))
    columns = ("graph", "ms / call", "vs fused baseline", *(("plugin form (map kernels)",) if kernels else ()),
               "map layer", "map share")
    for column in columns:
        table.add_column(column, justify="left" if column == "graph" else "right")
    table.add_row("baseline", f"{prediction.baseline.seconds * 1e3:.2f}", "1.00×", *(("1.00×",) if kernels else ()),
                  "-", "-")
    for name, stage in prediction.stages.items():
        table.add_row(name, f"{stage.seconds * 1e3:.2f}", _ratio(prediction.speedup(name)),
                      *((_ratio(prediction.kernels_speedup(name)),) if kernels else ()),
                      f"{stage.map_seconds * 1e3:.2f} ms", f"{stage.map_share:.0%}")
    table.add_section()
    table.add_row("schedule", "", _ratio(prediction.schedule_speedup),
                  *((_ratio(prediction.kernels_schedule_speedup),) if kernels else ()), "", "")
    batched = f", {MAP_BATCHES[map_batch]}" if map_batch else ""
    table.caption = Text(dev.source + (f". vs fused baseline: the portable form (the map layer as standard ops{batched}, "
                                       "what onnxruntime and today's engines run; ms, map layer and share are its); plugin "
                                       "form: the map layer on its kernels (its atedm nodes; map_impl 'kernels' in "
                                       "PyTorch)" if kernels else ""))
    return table


def _keep_table(tokens: dict[str, int], stages: dict[str, dict[str, int]], where: str = "") -> Table:
    """Blocks × stages: the tokens each stage keeps in each attention block ("all": not pruned), with roles."""
    from .dsap import block_roles

    table = Table(title=f"kept tokens per attention block{where} (all = not pruned)")
    table.add_column("block")
    table.add_column("roles")
    table.add_column("tokens", justify="right")
    for name in stages:
        table.add_column(name, justify="right")
    roles = block_roles(tokens)
    for block, count in tokens.items():
        kept = ["all" if keep[block] >= count else str(keep[block]) for keep in stages.values()]
        table.add_row(block, ", ".join(roles[block]), str(count), *kept)
    return table


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}"


def _graphs_table(manifest, title: str | Text) -> Table:  # noqa: ANN001
    """Every graph of a build, a section per shape (the grid of shapes × stages) with its schedule's total."""
    from .buildfolder import views
    from .inspection import graph_summary, schedule_totals

    base = manifest.shapes[0].baseline.graph_tflops
    scale, unit = (1.0, "TFLOPs") if base >= 0.1 else (1e3, "GFLOPs")
    multi = manifest.multi_shape
    table = Table(title=title)
    columns = ["shape"] * multi + ["graph", "steps", "pruned", "kept", f"{unit}/img-step", "saving", "forms",
                                   "ONNX MiB", "engine MiB", "export s", "compile s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("shape", "graph") else "right")
    for index, view in enumerate(views(manifest)):
        if index:
            table.add_section()
        blocks = len(view.tokens)
        shape = [view.shape.key] * multi
        for entry in view.graphs():
            g = graph_summary(view, entry)
            steps = f"{entry.steps[0]}-{entry.steps[1] - 1}" if entry.step_count else "(none)"
            table.add_row(
                *shape, entry.name + (f" (= {entry.same_as})" if entry.same_as else ""), steps,
                f"{g['pruned_blocks']}/{blocks}", f"{g['kept_fraction']:.0%}", f"{g['graph_tflops'] * scale:.3f}",
                "-" if entry.name == "baseline" else f"{g['saving']:.1%}", ", ".join(g["forms"]),
                _mib(g["onnx_bytes"]), _mib(g["engine_bytes"]), _secs(g["export_seconds"]), _secs(g["compile_seconds"]),
            )
        totals = schedule_totals(view)
        if totals:
            if not multi:
                table.add_section()
            table.add_row(*shape, "schedule", str(totals["steps"]), "", "", f"{totals['graph_tflops'] * scale:.3f}",
                          f"{totals['saving']:.1%}", "", "", "", "", "", style="bold" if multi else None)
    return table


def _check_outputs(*paths: Path | None, suffixes: dict[Path, tuple[str, ...]] | None = None) -> None:
    """Refuse report files that could not be written (or are not a format we write) before minutes of work."""
    from .staging import check_output_file

    for path in paths:
        if path is not None:
            check_output_file(path, (suffixes or {}).get(path, ()))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _engine_options(backend: str, cuda_graphs: bool, weights: str) -> dict[str, object]:
    """The engine backend's options; other backends take none, so asking them for one is an error."""
    if backend in ENGINE_LIBRARIES:
        return {"cuda_graphs": cuda_graphs, "weights": weights}
    if cuda_graphs or weights != "resident":
        raise AtedmError(f"--cuda-graphs and --engine-weights apply to the engine backends "
                         f"({', '.join(ENGINE_LIBRARIES)}), not {backend}")
    return {}


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _gpu_list(value: str | None) -> tuple[int, ...]:
    """``--gpus 0,1`` as GPU indices; anything else is one line (what is wrong, what was expected)."""
    items = _split(value)
    if value is not None and not items or not all(item.isdigit() for item in items):
        raise AtedmError(f"--gpus {value!r}: expected GPU indices separated by commas, e.g. 0,1")
    return tuple(int(item) for item in items)


@main.command()
@click.argument("spec", default="tiny-sdxl")
@click.option("--schedule", help="DSAP schedule instead of the spec's: a preset (paper, uniform-63, dagger, none) or a "
                                 "YAML file.")
@click.option("--prune-point", type=click.Choice(["attn1", "layer"]), help="Override the spec's prune point.")
@click.option("--map-batch", type=click.Choice(["head", "all"]),
              help="Override the spec's map_batch: the exported map layer's per-head maps one head at a time (head) or "
                   "in one batched product (all).")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Build folder to create [default: build/<spec name>].")
@click.option("--library", "--backend", "library", type=click.Choice(BUILD_LIBRARIES), default="auto", show_default=True,
              help="Engine library; auto takes tensorrt, else tensorrt-rtx; onnx builds graphs only (--backend: its "
                   "older name).")
@click.option("--target", help="Compute capabilities for tensorrt-rtx, e.g. sm89 or sm86,sm89 (default: the GPU present).")
@click.option("--precision", type=click.Choice(PRECISION_NAMES), help="Override the spec's precision.")
@click.option("--stages", help="Build only these DSAP stages (comma-separated); the baseline is always built.")
@click.option("--force", is_flag=True, help="Replace an existing build folder.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimization level.")
@click.option("--workspace", type=FiniteFloat(min=0.1), help="Builder workspace limit in GiB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="TensorRT timing cache file (read and updated).")
@click.option("--strip-weights/--keep-weights", default=None,
              help="Weight-stripped engines, refitted from the ONNX weights at load [default: above 2 GB, on a GPU machine].")
@click.option("--ort-fusion/--no-ort-fusion", default=None,
              help="Also write each graph's onnxruntime form, attention fused by onnxruntime's optimizer (~25 s a "
                   "graph) [default: for UNets over 1 GB of weights].")
@click.option("--refittable-engines", "refittable", is_flag=True,
              help="Engines that take other weights (BuilderFlag.REFIT): refit --lora links them instead of rebuilding, "
                   "and StagedUNet.use_weights refits them in place.")
@click.option("--plugin-form", is_flag=True,
              help="Also write each pruned graph's plugin form: the map layer as the Triton kernels' atedm nodes "
                   "(dynamo exporter; verify runs it in onnxruntime through the kernels). Engines keep the portable "
                   "form (docs/build.md).")
def build(spec: str, schedule: str | None, prune_point: str | None, map_batch: str | None, out: Path | None, library: str, target: str | None, precision: str | None, stages: str | None,
          force: bool, opt_level: int, workspace: float | None, timing_cache: Path | None,
          strip_weights: bool | None, ort_fusion: bool | None, refittable: bool, plugin_form: bool) -> None:
    """Export every DSAP stage of SPEC (and the unpruned baseline) to ONNX and compile engines.

    SPEC is a graph spec YAML file or a built-in spec name (default: tiny-sdxl). The build is written to
    a hidden folder beside OUT and moved into place only when complete.
    """
    import re

    from .build import BuildRequest
    from .build import build as run_build
    from .spec import load_spec

    graph_spec = load_spec(spec).with_schedule(schedule).with_prune_point(prune_point).with_map_batch(map_batch)
    if precision:
        graph_spec = graph_spec.model_copy(update={"precision": precision})
    out = out or Path("build") / graph_spec.name
    targets = _split(target)
    for t in targets:
        if not re.fullmatch(r"sm\d{2,3}", t):
            raise AtedmError(f"unknown target '{t}'; expected a compute capability such as sm86 or sm89")
    request = BuildRequest(graph_spec, out, library, targets, _split(stages), force, opt_level, workspace, timing_cache,
                           strip_weights, ort_fusion, refittable_engines=refittable,
                           plugin_form=plugin_form)
    start = time.perf_counter()
    with _progress("building", 10) as progress:
        manifest = run_build(request, progress)
    out_console = out.resolve()
    console.print(_graphs_table(manifest, Text(f"{graph_spec.name} → {out_console}")))
    if manifest.engine.skipped:
        _say("engines skipped:", "yellow", manifest.engine.skipped)
    _say("built", "green", f"{out_console} in {time.perf_counter() - start:.1f}s")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--lora", "loras", multiple=True, required=True, metavar="FILE[:SCALE]",
              help="A LoRA .safetensors (diffusers/PEFT or kohya) and its scale [default 1]; repeat for several.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Build folder to create.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def refit(build_dir: Path, loras: tuple[str, ...], out: Path, force: bool) -> None:
    """Write a new build of BUILD_DIR's graphs with LoRAs fused into their weights, in seconds, not a rebuild.

    Only the tensors the LoRAs change are written (a small weights file beside the base one, which is hard-linked);
    the graphs are BUILD_DIR's, pointing into it. The LoRAs add to those the build already has.
    """
    from .refit import RefitRequest, iter_loras
    from .refit import refit as run_refit

    request = RefitRequest(build_dir, tuple(iter_loras(loras)), out, force)
    with _progress("refitting", 11) as progress:
        result = run_refit(request, progress)
    if result.manifest.engine.skipped and not any("engines" in n for n in result.notes):
        _say("engines skipped:", "yellow", result.manifest.engine.skipped)
    _say("refitted", "green", f"{out.resolve()} in {result.seconds:.1f}s: {result.delta_bytes / 1e6:.1f} MB of new "
                              f"weights; hashing {result.hashing_seconds:.1f}s, writing {result.writing_seconds:.1f}s")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--device", "devices", multiple=True, type=click.Choice(COST_DEVICES, case_sensitive=False),
              help="Also the cost model's predicted speedups of the build's stages on this device (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(build_dir: Path, devices: tuple[str, ...], as_json: bool) -> None:
    """Stages, steps, kept tokens per block, FLOPs, file sizes and op histogram of a build."""
    from .costmodel import device
    from .flops import flops_report
    from .buildfolder import first_view, read_manifest, views
    from .inspection import inspect_build

    manifest = read_manifest(build_dir)
    view = first_view(manifest)  # what a single-shape build shows; other shapes have the same ops and attentions
    data = inspect_build(build_dir, manifest)
    predictions = flops_report(view.graph_spec, tuple(device(d) for d in dict.fromkeys(devices))).predictions \
        if devices else []
    data["predictions"] = {p.device.key: p.to_json() for p in predictions}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    spec = view.graph_spec
    engine = manifest.engine
    engines = (f"{engine.library} {engine.version} for {','.join(engine.targets) or 'the local GPU'}, built from "
               f"the {engine.form} form" + (f" ({engine.form_reason})" if engine.form_reason else "")
               if engine.built else f"none ({engine.skipped})")
    from .shapes import shape_keys

    sizes = (f"{len(manifest.shapes)} shapes ({shape_keys(manifest.shape_list)})" if manifest.multi_shape
             else f"{spec.width}x{spec.height}, batch {spec.batch}")
    out.print(Text.assemble((spec.name, "bold"), f": {spec.model} {sizes}, "
              f"{spec.precision}, {spec.steps} steps, method '{spec.method}', schedule '{spec.dsap.name}'; engines: {engines}"),
              highlight=False)
    from .pruning import AtedmOptions
    from .pruning.methods import summary_of
    from .pruning.options import MAP_BATCHES, MAP_IMPLS

    out.print(Text(f"method: {summary_of(spec.method)}"))
    if isinstance(spec.pruning, AtedmOptions):
        plugin = any(e.plugin_onnx for e in manifest.all_graphs())
        out.print(Text(f"map layer in PyTorch: map_impl '{spec.pruning.map_impl}' ({MAP_IMPLS[spec.pruning.map_impl]}); "
                       f"in the graphs: standard ONNX ops, {MAP_BATCHES[spec.pruning.map_batch]} (portable form)"
                       + ("; the kernels' atedm nodes (plugin form)" if plugin else "")))
    out.print(_graphs_table(manifest, "graphs"))
    for shaped in views(manifest):
        out.print(_keep_table(shaped.tokens, {e.name: e.keep for e in shaped.stages},
                              f" at {shaped.shape.key}" if manifest.multi_shape else ""))
    first = {view.label(entry.name) for entry in view.graphs()}
    for name, forms in data["attention"].items():
        if name not in first:
            continue
        fused = (f"; {forms['onnxruntime_fused']} fused kernels in its onnxruntime form"
                 if "onnxruntime_fused" in forms else "")
        plugin = f"; {forms['plugin_nodes']} atedm nodes in its plugin form" if "plugin_nodes" in forms else ""
        out.print(Text(f"{name}: {forms['fusable']} attentions in TensorRT's fused form, {forms['map']} maps read "
                       f"by the map layer{fused}{plugin}"))
    ops = Table(title="op histogram (top 12)" + (f", at {view.shape.key}" if manifest.multi_shape else ""))
    ops.add_column("op")
    graphs = [g for g in data["ops"] if g in first]
    for g in graphs:
        ops.add_column(g, justify="right")
    first = data["ops"][graphs[0]]
    for op in list(first)[:12]:
        ops.add_row(op, *(str(data["ops"][g].get(op, 0)) for g in graphs))
    out.print(ops)
    shared, sizes = data["weights"], data["onnx_bytes"]
    out.print(f"weights: {_mib(shared['bytes'])} MiB in {shared['path']}, shared by {shared['graphs_sharing']} graphs; "
              f"graphs on disk {_mib(sizes['on_disk'])} MiB ({sizes['on_disk'] / shared['bytes']:.2f}x the weights; "
              f"{_mib(sizes['unshared'])} MiB with a copy each)", highlight=False)
    if manifest.weights_delta:
        source = f" (refit of {manifest.refit.build})" if manifest.refit else ""
        out.print(Text(f"of which {_mib(manifest.weights_delta.bytes)} MiB in {manifest.weights_delta.path}: the tensors "
                       f"its LoRAs changed, beside the base {manifest.weights.path}{source}"))
    for lora in manifest.loras:
        out.print(Text(f"LoRA {lora.file} (scale {lora.scale:g}, sha256 {lora.sha256[:12]}…) fused into the weights"))
    out.print(f"total on disk: {_mib(data['total_bytes'])} MiB", highlight=False)
    for prediction in predictions:
        out.print(_prediction_table(prediction, spec.batch, spec.precision, getattr(spec.pruning, "map_batch", None)))


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--shape", "shapes", metavar="WxH[:BATCH]", multiple=True,
              help="Only the graphs of this shape of a multi-shape build (repeatable) [default: every shape].")
def verify(build_dir: Path, as_json: bool, seed: int, shapes: tuple[str, ...]) -> None:
    """Each graph of a build against the eager pruned module (its method's) on the same random inputs, at each of
    the build's shapes.

    Exit status 1 when any graph is outside the tolerances of its precision.
    """
    from .shapes import parse_shape
    from .verify import verify_build

    wanted = [parse_shape(s) for s in shapes]
    with console.status("verifying…"):
        checks = verify_build(build_dir, seed=seed, shapes=wanted or None)
    passed = all(c.passed for c in checks)
    if as_json:
        click.echo(json.dumps({"passed": passed, "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        table = Table(title=Text(f"{build_dir}: graphs vs the eager module (a plugin form vs its portable form)"))
        for column in ("graph", "backend", "vs", "max abs", "max rel", "mean abs", "cosine", "atol / rtol", "result"):
            table.add_column(column, justify="left" if column in ("graph", "backend", "vs") else "right")
        for c in checks:
            table.add_row(c.graph, c.backend, c.reference, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", f"{c.mean_abs:.2e}",
                          f"{c.cosine:.8f}", f"{c.atol:g} / {c.rtol:g}", Text("pass", "green") if c.passed else Text("FAIL", "red"))
        table.caption = Text("an element passes where |a−b| ≤ atol or |a−b| ≤ rtol·|b| (polygraphy's rule): max rel "
                             "may pass rtol where the values are near zero and their difference within atol")
        out.print(table)
    if not passed:
        sys.exit(1)


def _pipeline_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options of the commands that run the family's pipeline on a backend (``generate``, ``eval``)."""
    options = [
        click.option("--guidance", type=FiniteFloat(min=0.0), default=None,
                     help="Classifier-free guidance scale [default: the family's: 7.5 for SD 1.x/2.x, 5 for SDXL]."),
        click.option("--backend", type=click.Choice(RUNTIME_BACKENDS), default="onnxruntime", show_default=True),
        click.option("--device", type=TorchDevice(), default=None,
                     help="torch device for the backend [default: cpu, cuda for TensorRT]."),
        click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
                     help="Engine backends: capture each stage's launch once and replay it."),
        click.option("--engine-weights", type=click.Choice(ENGINE_WEIGHTS), default="resident", show_default=True,
                     help="Engine backends: every stage's weights on the GPU, or one stage's at a time (TensorRT-RTX)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path), required=False)
@click.option("--triton", "triton_url", metavar="URL",
              help="Run the UNet on a Triton server instead of a local build: http://HOST:PORT or grpc://HOST:PORT.")
@click.option("--triton-model", default="atedm_unet", show_default=True, help="The router model's name on the server.")
@click.option("--prompt", "-p", required=True, help="What to draw.")
@click.option("--negative-prompt", default=None, help="What to avoid.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Denoising steps [default: the spec's].")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="SDXL refiner builds: the image to refine (resized to the build's size where it differs).")
@click.option("--strength", type=FiniteFloat(0.0, 1.0, min_open=True), default=0.3, show_default=True,
              help="SDXL refiner builds: how much of the denoising to redo (the last fraction of the steps).")
@click.option("--width", type=click.IntRange(min=8), default=None,
              help="Image width: one of the build's shapes [default: its first shape's].")
@click.option("--height", type=click.IntRange(min=8), default=None,
              help="Image height: one of the build's shapes [default: its first shape's].")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="UNet batch (2 per image with guidance): one of the build's shapes at that size [default: the first].")
@_pipeline_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
def generate(build_dir: Path | None, triton_url: str | None, triton_model: str, prompt: str, negative_prompt: str | None,
             steps: int | None, seed: int, guidance: float | None, image: Path | None, strength: float,
             width: int | None, height: int | None, batch: int | None, backend: str,
             device: str | None, cuda_graphs: bool, engine_weights: str, output: Path) -> None:
    """Run the stock pipeline of the build's model family with its stage graphs as the UNet; write one PNG.

    SD 1.x/2.x builds run StableDiffusionPipeline, SDXL builds StableDiffusionXLPipeline, SDXL refiner
    builds StableDiffusionXLImg2ImgPipeline on --image. The UNet runs locally on BUILD_DIR's graphs,
    or, with --triton, on a Triton server that serves a repository written by `atedm-export deploy`
    (the build's manifest is read from the server).
    """
    from .runtime import StagedUNet
    from .runtime.pipeline import generate as run_generate

    if (build_dir is None) == (triton_url is None):
        raise AtedmError("give either BUILD_DIR (run the graphs here) or --triton URL (run them on a server), not both")
    _check_outputs(output, suffixes={output: (".png",)})
    if triton_url:
        from .deploy.client import connect

        staged, backend = connect(triton_url, triton_model), f"Triton ({triton_url})"
    else:
        staged = StagedUNet.load(build_dir, backend=backend, device=device,
                                 **_engine_options(backend, cuda_graphs, engine_weights))
    start = time.perf_counter()
    with console.status(f"denoising on {backend}…") as status:
        def on_step(step: int, steps: int) -> None:
            status.update(f"denoising: step {step + 1}/{steps} ({time.perf_counter() - start:.1f}s)")

        done = run_generate(staged, prompt, output, negative_prompt=negative_prompt, steps=steps, seed=seed,
                            guidance=guidance, image=image, strength=strength, on_step=on_step, width=width,
                            height=height, batch=batch)
    table = Table(title=Text(f"{done.steps} steps on {backend} in {done.seconds:.1f}s"))
    for column in ("stage", "steps", "UNet calls", "UNet seconds"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in staged.stage_report():
        table.add_row(row["stage"], row["steps"], str(row["calls"]), f"{row['seconds']:.2f}")
    console.print(table)
    for what, cut in (("prompt", done.truncated_tokens), ("negative prompt", done.negative_truncated_tokens)):
        if cut:
            _say("note:", "yellow", f"the {what} runs {cut} tokens past the {done.token_limit} the text encoders read; "
                                    "those tokens were cut")
    if done.changed:
        _say("note:", "yellow", f"{len(done.changed)} file(s) of the pipeline changed since the build ("
                                f"{', '.join(done.changed[:3])}{', …' if len(done.changed) > 3 else ''}): "
                                "the image used the files as they are now")
    if done.resized_from:
        _say("note:", "yellow", f"the input image was {done.resized_from[0]}x{done.resized_from[1]}; "
                                f"resized to the build's {done.width}x{done.height}")
    several = f"; the build's batch draws {len(done.written)} images a call" if len(done.written) > 1 else ""
    _say("wrote", "green", f"{', '.join(map(str, done.written))} ({done.width}x{done.height}{several})")


@main.command("eval")
@click.argument("builds", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the images and reports: new, empty, or one an earlier eval of the same prompts made "
                   "(its matching images are reused).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="Text file, one prompt per line.")
@click.option("--coco-captions", type=click.Path(path_type=Path),
              help="COCO captions JSON (annotations/captions_val2017.json): one caption per image, by image id.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N prompts.")
@click.option("--seed", "--seeds", "seed", type=SEED, default=0, show_default=True,
              help="Base seed: image i is drawn with seed + i in every set.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Denoising steps [default: the specs'].")
@_pipeline_options
@click.option("--clip", type=click.Path(path_type=Path),
              help="transformers CLIP checkpoint folder for the CLIP score (e.g. laion/CLIP-ViT-g-14-laion2B-s12B-b42K).")
@click.option("--inception", type=click.Path(path_type=Path),
              help="NVlabs' TorchScript Inception (inception-2015-12-05.pt) for FID and KID.")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Folder of real images FID and KID compare against (e.g. COCO val2017) [default: the unpruned set].")
def eval_command(builds: tuple[Path, ...], out_dir: Path, prompts_file: Path | None, coco_captions: Path | None,
                 limit: int | None, seed: int, steps: int | None, guidance: float | None, backend: str,
                 device: str | None, cuda_graphs: bool, engine_weights: str, clip: Path | None, inception: Path | None,
                 reference: Path | None) -> None:
    """Quality and speed of builds against the unpruned model: the same prompts and seeds through each.

    Draws every prompt through the unpruned graph (the first build's baseline at every step) and through each
    BUILD (its DSAP stages, as generate runs them), then scores each set: PSNR, SSIM and LPIPS against the
    unpruned images, CLIP score with --clip, FID and KID with --inception, seconds per image. Writes OUT/eval.json,
    eval.csv, grid.png, quality-speed.png and the images; a rerun reuses every image drawn with the same settings.
    """
    from .evaluate.report import rows, write_all
    from .evaluate.request import EvalRequest, prepare
    from .evaluate.run import draw_all
    from .evaluate.score import score

    request = EvalRequest(builds, out_dir, prompts_file, coco_captions, limit, seed, steps, guidance, backend, device,
                          _engine_options(backend, cuda_graphs, engine_weights), clip, inception, reference)
    start = time.perf_counter()
    with console.status("checking the builds and the metrics' files…"):
        plan = prepare(request)
    width = max(12, *(len(job.label) for job in plan.jobs))
    _say("eval:", "bold", f"{len(plan.prompts)} prompts ({plan.prompt_source}), seeds {seed}..{plan.seeds[-1]}, "
                          f"{plan.steps} steps, guidance {plan.guidance:g}, on {plan.backend_name} ({plan.device})")

    def progress(label: str, event: str, seconds: float | None) -> None:
        _progress_line(start, label, width, event, seconds)

    try:
        sets = draw_all(plan, progress)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: what was drawn is kept on purpose, for the rerun
        _say("interrupted:", "bold red", f"the images drawn so far are kept in {out_dir}; run the same command to "
                                         "draw the rest")
        sys.exit(128 + exc.signum if isinstance(exc, Terminated) else 130)
    table = rows(sets, score(plan, sets, progress))
    paths = write_all(out_dir, plan, sets, table)
    out.print(_eval_table(table, Text(f"{len(plan.prompts)} images per set, {plan.steps} steps on {plan.backend_name}")))
    for note in plan.notes:
        _say("note:", "yellow", note)
    _say("wrote", "green", f"{', '.join(str(p) for p in paths)} and the images under {out_dir / 'images'} "
                           f"in {time.perf_counter() - start:.1f}s")


def _eval_table(table: list[dict], title: Text) -> Table:
    """One row per image set: speed, fidelity to the unpruned images, prompt alignment, distribution."""
    columns = [("set", "label"), ("schedule", "schedule"), ("s / image", "seconds_per_image"),
               ("vs unpruned", "speedup_vs_unpruned"), ("PSNR dB", "psnr"), ("SSIM", "ssim"), ("LPIPS", "lpips"),
               ("CLIP", "clip_score"), ("FID", "fid"), ("KID", "kid")]
    shown = [(name, key) for name, key in columns if any(key in row for row in table)]
    result = Table(title=title)
    for name, key in shown:
        result.add_column(name, justify="left" if key in ("label", "schedule") else "right")
    for row in table:
        result.add_row(*(Text(_eval_cell(key, row.get(key))) for _, key in shown))
    return result


def _eval_cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if key == "speedup_vs_unpruned":
        return _ratio(float(value))
    if not math.isfinite(float(value)):
        return "inf"
    if key in ("fid", "kid"):  # FID runs from ~0 (same distribution) to hundreds; KID from ~0 to ~1
        return f"{float(value):.4g}"
    digits = {"seconds_per_image": 2, "psnr": 2, "ssim": 4, "lpips": 4, "clip_score": 2}
    return f"{float(value):.{digits.get(key, 3)}f}"


@main.command()
@click.argument("build_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backends", default="eager,onnxruntime", show_default=True,
              help=f"Comma-separated, from: {', '.join(RUNTIME_BACKENDS)}; 'eager' includes the stock diffusers UNet.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--device", type=TorchDevice(), default=None, help="torch device [default: cpu; cuda for TensorRT].")
@click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
              help="Engine backends: capture each stage's launch once and replay it.")
@click.option("--engine-weights", type=click.Choice(ENGINE_WEIGHTS), default="resident", show_default=True,
              help="Engine backends: every stage's weights on the GPU, or one stage's at a time (TensorRT-RTX).")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Write the full report as JSON (several builds: {\"builds\": [...], \"side_by_side\": [...]}).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write one row per build, backend and graph.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Write a PNG bar chart (several builds: seconds per image of each, side by side).")
@click.option("--shape", metavar="WxH[:BATCH]",
              help="Time the graphs of this shape of a multi-shape build, e.g. 1216x832 [default: its first shape].")
def bench(build_dirs: tuple[Path, ...], backends: str, warmup: int, repeats: int, device: str | None, cuda_graphs: bool,
          engine_weights: str, json_path: Path | None, csv_path: Path | None, plot_path: Path | None,
          shape: str | None) -> None:
    """Latency of every graph in every backend, side by side in one run, with speedup ratios.

    Several BUILD_DIRS of one model (an AT-EDM build and a ToMe build at the same FLOPs, say) are timed one after
    the other in the same run and end with one table of their whole schedules side by side.
    """
    from .bench import run_benches, side_by_side, write_csv, write_plot, write_side_by_side_plot
    from .runtime.backends import backend_types
    from .shapes import parse_shape

    _check_outputs(json_path, csv_path, plot_path, suffixes={plot_path: (".png",)} if plot_path else None)
    from .userfiles import check_distinct

    check_distinct(build_dirs)
    names = list(_split(backends))
    classes = backend_types(names)
    engine = next((n for n, cls in zip(names, classes) if cls.takes_engine_options), ",".join(names))
    _engine_options(engine, cuda_graphs, engine_weights)  # refused before any timing when no engine backend is named
    with console.status("benchmarking…") as status:
        reports = run_benches(list(build_dirs), names, warmup, repeats, device,
                              progress=lambda s: status.update(f"timing {s}…"),
                              engine_options=_engine_options(engine, cuda_graphs, engine_weights),
                              shape=parse_shape(shape) if shape else None)
    for report in reports:
        _print_bench(report, warmup, repeats, several=len(reports) > 1)
    if len(reports) > 1:
        out.print(_side_by_side_table(reports))
    if json_path:
        data = reports[0] if len(reports) == 1 else {"builds": reports, "side_by_side": side_by_side(reports)}
        json_path.write_text(json.dumps(data, indent=2) + "\n")
    if csv_path:
        write_csv(reports, csv_path)
    if plot_path:
        (write_plot(reports[0], plot_path) if len(reports) == 1 else write_side_by_side_plot(reports, plot_path))


def _print_bench(report: dict, warmup: int, repeats: int, several: bool) -> None:
    where = f"{report['build']} ({report['method']}), " if several else ""
    table = Table(title=Text(f"{where}{report['spec']}: median ms per UNet call ({repeats} repeats after {warmup} "
                             f"warm-up; batch {report['batch']}, {report['precision']})"))
    for column in ("backend", "graph", "form", "median ms", "p10-p90 ms", "vs eager", "vs fastest unpruned",
                   "FLOPs predict"):
        table.add_column(column, justify="left" if column in ("backend", "graph", "form") else "right")
    for r in report["rows"]:
        label = "stock diffusers UNet" if (r["backend"], r["graph"]) == ("eager", "baseline") else r["graph"]
        reference = report["references"][r["backend"]]
        if r["graph"] == "baseline" and r["form"] == reference["form"]:
            label += " (reference)"
        table.add_row(r["backend"], label, r["form"], f"{r['median_ms']:.1f}", f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}",
                      _ratio(r["speedup_vs_eager"]), _ratio(r["speedup_vs_unpruned"]), _ratio(r["flops_speedup"]))
    out.print(table)
    for name, reference in report["references"].items():
        out.print(Text(f"{name} reference (its fastest baseline): {reference['what']}"))
    if report["schedule"]:
        sched = Table(title=f"whole schedule, per image ({report['steps']} steps)")
        from .pruning.methods import label_of

        method = label_of(report["method"])
        for column in ("backend", "form", f"{method} s", "fastest unpruned s", "vs unpruned", "vs eager", "FLOPs predict"):
            sched.add_column(column, justify="left" if column in ("backend", "form") else "right")
        for s in report["schedule"]:
            sched.add_row(s["backend"], s["form"], f"{s['seconds_per_image']:.2f}", f"{s['unpruned_seconds_per_image']:.2f}",
                          _ratio(s["speedup_vs_unpruned"]), _ratio(s["speedup_vs_eager"]), _ratio(s["flops_speedup"]))
        out.print(sched)


def _side_by_side_table(reports: list[dict]) -> Table:
    from .bench import side_by_side

    table = Table(title=f"side by side: whole schedule, seconds per image ({reports[0]['steps']} steps)")
    for column in ("build", "method", "schedule", "backend", "form", "s / image", "fastest unpruned s", "vs unpruned",
                   "FLOPs predict"):
        table.add_column(column, justify="right" if column.startswith(("s /", "fastest", "vs", "FLOPs")) else "left")
    for s in side_by_side(reports):
        table.add_row(Text(s["build"]), s["method"], Text(s["schedule_name"]), s["backend"], s["form"],
                      f"{s['seconds_per_image']:.2f}", f"{s['unpruned_seconds_per_image']:.2f}",
                      _ratio(s["speedup_vs_unpruned"]), _ratio(s["flops_speedup"]))
    return table

@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--triton", "repository", required=True, type=click.Path(path_type=Path),
              help="Model repository folder to write, or an existing one to add the models to (others' models are kept).")
@click.option("--name", help="Name of the UNet model clients call [default: atedm_unet; --next-version: the "
                             "deployment's].")
@click.option("--next-version", is_flag=True,
              help="Add the build to the deployment in REPO as the next version of every model, beside the serving one "
                   "(a refit, a new schedule; the same shapes and serving options); then move the servers to it with "
                   "atedm-export rollout.")
@click.option("--variant", "--backend", "variant", type=click.Choice(["auto", *DEPLOY_VARIANTS]), default="auto",
              show_default=True,
              help="tensorrt: the build's TensorRT plans as tensorrt_plan models (GPU servers); onnxruntime: the ONNX "
                   "graphs in Python-backend models (CPU servers); auto: tensorrt where the build has TensorRT plans "
                   "(--backend: its older name).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of each model (tensorrt: on each GPU of --gpus).")
@click.option("--gpus", help="tensorrt variant: the GPUs each graph model runs on, e.g. 0,1 (an instance group of "
                             "--instances on each; Triton spreads the calls) [default: every GPU the server sees].")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Rows (latents) per request and per dynamic batch [default: the build's static batch].")
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True,
              help="How long the dynamic batcher waits to fill a batch.")
@click.option("--link", is_flag=True, help="Hard-link the artifacts instead of copying them (same filesystem).")
@click.option("--force", is_flag=True, help="Replace the deployment an earlier deploy wrote in REPO (only what its "
                                            "atedm-deploy.json lists; other models are never touched), and a "
                                            "--kubernetes folder an earlier deploy wrote.")
@click.option("--kubernetes", "kubernetes_dir", type=click.Path(path_type=Path),
              help="Also write Kubernetes manifests that serve REPO: a kustomization (kubectl apply -k DIR) and KServe's "
                   "InferenceService in DIR/kserve, validated offline (docs/deploy.md).")
@click.option("--storage-uri", help="With --kubernetes: where you will upload REPO (s3://, gs:// or as://, read by Triton "
                                    "itself) [default: a volume you copy REPO into].")
@click.option("--load-seconds", type=FiniteFloat(min=0.1),
              help="With --kubernetes: the servers' model-load time ('ready in' of atedm-export serve); the startup "
                   "probe allows three times it [default: guessed from the files' size].")
@click.option("--max-replicas", type=click.IntRange(min=1), default=4, show_default=True,
              help="With --kubernetes: the autoscaler's most servers.")
def deploy(build_dir: Path, repository: Path, name: str | None, next_version: bool, variant: str, instances: int,
           gpus: str | None, max_batch: int | None, queue_delay_us: int, link: bool, force: bool,
           kubernetes_dir: Path | None, storage_uri: str | None, load_seconds: float | None, max_replicas: int) -> None:
    """Write a Triton Inference Server model repository for a build.

    One model per graph (TensorRT plans, or ONNX graphs on onnxruntime) and a router model that takes
    the UNet call plus the step and step count, and runs each row on its DSAP stage's graph. Every
    config is checked with Triton's model-config protobuf and every copied file against its sha256.
    """
    from .deploy.repository import DEFAULT_ROUTER, DeployRequest, read_record
    from .deploy.repository import deploy as run_deploy
    from .deploy.versions import next_version as run_next_version

    start = time.perf_counter()

    def progress(model: str, event: str) -> None:
        _progress_line(start, model, 24, event)

    if next_version and (force or kubernetes_dir):
        raise AtedmError("--next-version adds to the deployment in REPO as it is; --force and --kubernetes are for "
                         "a deployment written anew: leave them out")
    if name is None:
        name = read_record(repository.resolve())["router"] if next_version else DEFAULT_ROUTER
    request = DeployRequest(build_dir, repository, name, variant=variant, instances=instances,
                            gpus=_gpu_list(gpus), max_batch=max_batch, queue_delay_us=queue_delay_us, link=link,
                            force=force, kubernetes=kubernetes_dir, storage_uri=storage_uri, load_seconds=load_seconds,
                            max_replicas=max_replicas)
    if kubernetes_dir is None and (storage_uri or load_seconds):
        raise AtedmError("--storage-uri and --load-seconds describe the cluster of --kubernetes DIR; add it")
    record = run_next_version(request, progress) if next_version else run_deploy(request, progress)
    versions = f", version {record['version']}" + (" (beside " + ", ".join(sorted(record["versions"], key=int)[:-1]) + ")"
                                                  if len(record["versions"]) > 1 else "")
    table = Table(title=Text(f"{repository.resolve()}: {record['variant']} variant{versions}"))
    for column in ("model", "serves", "files", "MiB"):
        table.add_column(column, justify="left" if column in ("model", "serves") else "right")
    for model, info in record["models"].items():
        serves = info["graph"] or "router: " + ", ".join(f"{g}→{m}" for g, m in info["routes"].items())
        table.add_row(model, serves, str(len(info["files"])), _mib(sum(f["bytes"] for f in info["files"])))
    console.print(table)
    if next_version:
        _say("wrote", "green", f"version {record['version']} into {repository} in {time.perf_counter() - start:.1f}s; "
                               f"move the servers to it with: atedm-export rollout {repository} --url URL")
        return
    _say("wrote", "green", f"{repository} in {time.perf_counter() - start:.1f}s; start it as "
                           f"{repository / record.get('readme', 'README.md')} says")


@main.command()
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--url", "urls", multiple=True, required=True,
              help="A server of REPO (http://HOST:PORT or grpc://HOST:PORT), started with explicit model control; "
                   "repeat it for each server (each pod).")
@click.option("--timeout", type=FiniteFloat(min=1), default=600, show_default=True,
              help="Seconds each server may take for each phase (loading the new version, unloading the old).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write what was done as JSON.")
def rollout(repository: Path, urls: tuple[str, ...], timeout: float, json_path: Path | None) -> None:
    """Move running servers to the newest version of REPO (deploy --next-version), then retire the old versions.

    On each server in turn the new version of every graph model loads beside the old; then the router's: Triton
    sends new requests to it once it is ready and unloads the old one after the requests in flight finish. No
    request is refused, and none mixes two versions. Then the old versions leave the repository and the servers.
    """
    import json

    from .deploy.client import parse_url
    from .deploy.rollout import rollout as run_rollout

    _check_outputs(json_path, suffixes={json_path: (".json",)} if json_path else None)
    for url in urls:
        parse_url(url)
    start = time.perf_counter()

    def progress(where: str, event: str) -> None:
        _progress_line(start, where, 28, event)

    report = run_rollout(repository, urls, timeout, progress)
    table = Table(title=Text(f"{repository.resolve()}: version {report['version']}"))
    for column in ("server", "served", "now", "switch s", "retire s"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for row in report["servers"]:
        table.add_row(row["url"], str(row["from"]), str(row["to"]), f"{row['switch_s']:.1f}", f"{row['retire_s']:.1f}")
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    retired = ", ".join(report["retired"]) or "none"
    _say("rolled out", "green", f"version {report['version']} on {len(report['servers'])} server(s) in "
                                f"{time.perf_counter() - start:.1f}s; old versions retired: {retired}")


@main.command()
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--timeout", type=FiniteFloat(min=1), default=300, show_default=True, help="Seconds to wait for readiness.")
@click.option("--log", "log_path", type=click.Path(path_type=Path),
              help="Keep the server's own log in this file [default: a temporary file, removed at exit].")
def serve(repository: Path, http_port: int, grpc_port: int, timeout: float, log_path: Path | None) -> None:
    """Serve a deployed repository with a local tritonserver on loopback, until Ctrl-C.

    The server is the one tools/setup.sh unpacks (nvidia-pytriton's, with the Python backend; it runs
    on a CPU), an NGC install, or $ATEDM_TRITONSERVER. Models run in this Python environment.
    """
    import signal

    from .deploy.repository import check_repository
    from .deploy.server import TritonServer, TritonServerError

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    _check_outputs(log_path)
    check_repository(repository, files=False)  # the models check their files as they load
    signal.signal(signal.SIGINT, interrupt)  # also where a parent started us with SIGINT ignored
    signal.signal(signal.SIGTERM, _terminate)  # `kill`, `docker stop`, systemd: stop the server, exit 143 as all do
    server = TritonServer(repository, http_port, grpc_port, log_path=log_path)
    start = time.perf_counter()
    try:
        with console.status(f"starting tritonserver on {server.http_url}…"):
            server.start(timeout)
        _say("ready", "green", f"in {time.perf_counter() - start:.1f}s: HTTP {server.http_url}, gRPC {server.grpc_url}; "
                               f"log {server.log_path}; Ctrl-C stops it")
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        raise TritonServerError(f"tritonserver stopped: {server.first_error()}")
    except TritonServerError:
        lines = [line for line in server.log().splitlines() if line.strip()][-15:]
        if lines:  # the server's own last words, before the one-line error
            console.print(Text(f"last {len(lines)} lines of the server's log"
                               + (f" ({log_path})" if log_path else "") + ":", style="dim"), highlight=False)
            for line in lines:
                console.print(Text("  " + line, style="dim"), highlight=False, soft_wrap=True)
        raise
    finally:
        server.stop()


@main.command("load-test")
@click.argument("urls", metavar="URL...", nargs=-1, required=True)
@click.option("--model", default="atedm_unet", show_default=True, help="The router model's name on the server.")
@click.option("--requests", "count", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--compare", "build_dir", type=click.Path(path_type=Path),
              help="Also time the same calls on this build's graphs in this process (onnxruntime), alternating with "
                   "the served ones at concurrency 1: what the server adds per call.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON.")
def load_test(urls: tuple[str, ...], model: str, count: int, concurrency: int, seed: int, build_dir: Path | None,
              json_path: Path | None) -> None:
    """UNet calls from concurrent clients to a served repository: latency percentiles, errors, identity.

    Requests cycle over the first step of every DSAP stage; each distinct request is sent alone first,
    and every concurrent output must equal it bit for bit. Several URLs (servers of one build): the clients are
    spread over them, as a Service spreads connections, and the table counts each server's requests. Exit status 1
    on any error or mismatch.
    """
    from .deploy.client import compare_local, parse_url
    from .deploy.client import load_test as run_load_test

    url = urls[0]
    if len(set(urls)) != len(urls):
        raise AtedmError(f"URL {next(u for u in urls if urls.count(u) > 1)} is given twice; expected each server once")
    for each in urls:
        parse_url(each)  # a malformed URL is one line before anything is sent

    _check_outputs(json_path)
    comparison = None
    if build_dir:
        with console.status("served vs in-process, alternating…"):
            comparison = compare_local(url, build_dir, model, seed=seed)
        table = Table(title=f"median ms per UNet call at concurrency 1, {comparison['calls']} calls each, alternating")
        for column in ("in-process (onnxruntime)", "served (Triton)", "server adds", "ratio", "outputs"):
            table.add_column(column, justify="right")
        table.add_row(f"{comparison['local_ms']:.1f}", f"{comparison['triton_ms']:.1f}", f"{comparison['overhead_ms']:+.1f}",
                      f"{comparison['ratio']:.2f}×", "identical" if comparison["identical"] else Text("DIFFER", "red"))
        out.print(table)
    with console.status("load test…") as status:
        report = run_load_test(urls, model, count, concurrency, seed,
                               progress=lambda i: status.update(f"load test: {i + 1}/{count} requests"))
    table = Table(title=Text(f"{report['spec']} on {', '.join(urls)} ({model}): {count} requests of batch "
                             f"{report['batch']}, {concurrency} concurrent clients"))
    spread = len(urls) > 1
    for column in ("errors", "mismatches", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests/s", "wall s",
                   *(["requests per server"] * spread)):
        table.add_column(column, justify="right")
    table.add_row(str(report["errors"]), str(report["mismatches"]), f"{report['p50_ms']:.1f}", f"{report['p90_ms']:.1f}",
                  f"{report['p99_ms']:.1f}", f"{report['max_ms']:.1f}", f"{report['throughput_rps']:.2f}",
                  f"{report['wall_seconds']:.1f}", *([" / ".join(map(str, report["per_server"]))] * spread))
    out.print(table)
    if report["first_error"]:
        _say("first error:", "red", report["first_error"])
    if json_path:
        json_path.write_text(json.dumps({**report, "compare": comparison}, indent=2) + "\n")
    if report["errors"] or report["mismatches"] or (comparison and not comparison["identical"]):
        sys.exit(1)
