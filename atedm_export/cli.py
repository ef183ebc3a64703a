"""``atedm-export``: the command-line front of the toolchain (click group, rich output).

User errors (``AtedmError``) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import AtedmError

# Rich wraps at 80 columns when output is not a terminal; tables of figures need more.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
out = Console(width=None if sys.stdout.isatty() else 140)


class _Group(click.Group):
    """Turns user errors into ``error: <one line>`` and exit status 2, with no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AtedmError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: nothing was left behind", highlight=False)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="atedm-export")
def main() -> None:
    """Bake AT-EDM token pruning into static SDXL UNet graphs and TensorRT engines."""


@main.command()
@click.argument("spec")
@click.option("--schedule", help="DSAP preset to use instead of the spec's (paper, uniform-63, dagger, none).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def flops(spec: str, schedule: str | None, as_json: bool) -> None:
    """FLOPs per image-step of each DSAP stage and the baseline, counted on the patched UNet.

    SPEC is a graph spec YAML file or a built-in spec name (tiny-sdxl, sdxl-base-1024).
    """
    from .flops import flops_report
    from .spec import load_spec

    report = flops_report(load_spec(spec).with_schedule(schedule))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    scale, unit = (1.0, "TFLOPs") if report.baseline_tflops >= 0.1 else (1e3, "GFLOPs")
    table = Table(title=f"{report.spec}: {report.model} at {report.width}x{report.height}, "
                        f"{report.steps} steps, schedule '{report.schedule}'")
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
    keep = Table(title="kept tokens per attention block")
    keep.add_column("block")
    keep.add_column("tokens", justify="right")
    for s in report.stages:
        keep.add_column(s.name, justify="right")
    for name, tokens in report.tokens.items():
        keep.add_row(name, str(tokens), *(str(s.keep[name]) for s in report.stages))
    out.print(keep)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}"


def _graphs_table(manifest, title: str) -> Table:  # noqa: ANN001
    from .report import graph_summary, schedule_totals

    base = manifest.baseline.graph_tflops
    scale, unit = (1.0, "TFLOPs") if base >= 0.1 else (1e3, "GFLOPs")
    table = Table(title=title)
    for column in ("graph", "steps", "pruned", "kept", f"{unit}/img-step", "saving",
                   "ONNX MiB", "engine MiB", "export s", "compile s"):
        table.add_column(column, justify="left" if column == "graph" else "right")
    blocks = len(manifest.tokens)
    for entry in manifest.graphs():
        g = graph_summary(manifest, entry)
        steps = f"{g['steps'][0]}-{g['steps'][1] - 1}" if g["steps"][1] > g["steps"][0] else "(none)"
        table.add_row(
            entry.name + (f" (= {entry.same_as})" if entry.same_as else ""), steps,
            f"{g['pruned_blocks']}/{blocks}", f"{g['kept_fraction']:.0%}", f"{g['graph_tflops'] * scale:.3f}",
            "-" if entry.name == "baseline" else f"{g['saving']:.1%}",
            _mib(g["onnx_bytes"]), _mib(g["engine_bytes"]), _secs(g["export_seconds"]), _secs(g["compile_seconds"]),
        )
    totals = schedule_totals(manifest)
    if totals:
        table.add_section()
        table.add_row("schedule", str(totals["steps"]), "", "", f"{totals['graph_tflops'] * scale:.3f}",
                      f"{totals['saving']:.1%}", "", "", "", "")
    return table


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@main.command()
@click.argument("spec")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Build folder to create.")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx", "onnx"]), default="auto",
              show_default=True, help="Engine library; auto takes tensorrt, else tensorrt-rtx; onnx builds graphs only.")
@click.option("--target", help="Compute capabilities for tensorrt-rtx, e.g. sm89 or sm86,sm89 (default: the GPU present).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="Override the spec's precision.")
@click.option("--stages", help="Build only these DSAP stages (comma-separated); the baseline is always built.")
@click.option("--force", is_flag=True, help="Replace an existing build folder.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimization level.")
@click.option("--workspace", type=click.FloatRange(min=0.1), help="Builder workspace limit in GiB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="TensorRT timing cache file (read and updated).")
def build(spec: str, out: Path, backend: str, target: str | None, precision: str | None, stages: str | None,
          force: bool, opt_level: int, workspace: float | None, timing_cache: Path | None) -> None:
    """Export every DSAP stage of SPEC (and the unpruned baseline) to ONNX and compile engines.

    The build is written to a hidden folder beside OUT and moved into place only when complete.
    """
    import re

    from .build import BuildRequest
    from .build import build as run_build
    from .spec import load_spec

    graph_spec = load_spec(spec)
    if precision:
        graph_spec = graph_spec.model_copy(update={"precision": precision})
    targets = _split(target)
    for t in targets:
        if not re.fullmatch(r"sm\d{2,3}", t):
            raise AtedmError(f"unknown target '{t}'; expected a compute capability such as sm86 or sm89")
    request = BuildRequest(graph_spec, out, backend, targets, _split(stages), force, opt_level, workspace, timing_cache)
    start = time.perf_counter()
    with console.status("building…") as status:
        def progress(graph: str, event: str, seconds: float | None) -> None:
            took = "" if seconds is None else f" [dim]({seconds:.1f}s)[/]"
            console.print(f"[dim]{time.perf_counter() - start:7.1f}s[/]  [bold]{graph:<10}[/] {event}{took}", highlight=False)
            status.update(f"{graph}: {event}…")

        manifest = run_build(request, progress)
    out_console = out.resolve()
    console.print(_graphs_table(manifest, f"{graph_spec.name} → {out_console}"))
    if manifest.engine.skipped:
        console.print(f"[yellow]engines skipped:[/] {manifest.engine.skipped}", highlight=False)
    console.print(f"[green]built[/] {out_console} in {time.perf_counter() - start:.1f}s", highlight=False)


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(build_dir: Path, as_json: bool) -> None:
    """Stages, steps, kept tokens per block, FLOPs, file sizes and op histogram of a build."""
    from .manifest import Manifest
    from .report import inspect_build

    manifest = Manifest.load(build_dir)
    data = inspect_build(build_dir, manifest)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    spec = manifest.graph_spec
    engine = manifest.engine
    engines = (f"{engine.backend} {engine.version} for {','.join(engine.targets) or 'the local GPU'}"
               if not engine.skipped else f"none ({engine.skipped})")
    out.print(f"[bold]{spec.name}[/]: {spec.model} {spec.width}x{spec.height}, batch {spec.batch}, {spec.precision}, "
              f"{spec.steps} steps, schedule '{spec.dsap.name}'; engines: {engines}", highlight=False)
    out.print(_graphs_table(manifest, "graphs"))
    keep = Table(title="kept tokens per attention block")
    keep.add_column("block")
    keep.add_column("tokens", justify="right")
    for entry in manifest.stages:
        keep.add_column(entry.name, justify="right")
    for name, tokens in manifest.tokens.items():
        keep.add_row(name, str(tokens), *(str(e.keep[name]) for e in manifest.stages))
    out.print(keep)
    ops = Table(title="op histogram (top 12)")
    ops.add_column("op")
    graphs = list(data["ops"])
    for g in graphs:
        ops.add_column(g, justify="right")
    first = data["ops"][graphs[0]]
    for op in list(first)[:12]:
        ops.add_row(op, *(str(data["ops"][g].get(op, 0)) for g in graphs))
    out.print(ops)
    out.print(f"total on disk: {_mib(data['total_bytes'])} MiB")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
def verify(build_dir: Path, as_json: bool, seed: int) -> None:
    """Each graph of a build against the eager AT-EDM module on the same random inputs.

    Exit status 1 when any graph is outside the tolerances of its precision.
    """
    from .verify import verify_build

    with console.status("verifying…"):
        checks = verify_build(build_dir, seed=seed)
    passed = all(c.passed for c in checks)
    if as_json:
        click.echo(json.dumps({"passed": passed, "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        table = Table(title=f"{build_dir}: graphs vs eager AT-EDM")
        for column in ("graph", "backend", "max abs", "max rel", "mean abs", "cosine", "atol / rtol", "result"):
            table.add_column(column, justify="left" if column in ("graph", "backend") else "right")
        for c in checks:
            table.add_row(c.graph, c.backend, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", f"{c.mean_abs:.2e}",
                          f"{c.cosine:.8f}", f"{c.atol:g} / {c.rtol:g}", "[green]pass[/]" if c.passed else "[red]FAIL[/]")
        out.print(table)
    if not passed:
        sys.exit(1)
