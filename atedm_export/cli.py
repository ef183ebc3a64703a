"""``atedm-export``: the command-line front of the toolchain (click group, rich output).

User errors (``AtedmError``) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import AtedmError

console = Console(stderr=True)
out = Console()


class _Group(click.Group):
    """Turns user errors into ``error: <one line>`` and exit status 2, with no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AtedmError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)


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
