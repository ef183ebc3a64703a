"""tools/cost_check.py --fit: how much of what the roofline misses is per kernel, fitted on measured calls."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from atedm_export.costmodel import device
from atedm_export.spec import load_spec

from .conftest import tool

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "cost_check.py"


@pytest.fixture(scope="module")
def cost_check():
    return tool("cost_check")


def _bench(spec, ms: dict[str, float]) -> dict:
    """A gpu-bench.json of tiny-sdxl whose stages part timed each of ``STAGES`` at ``ms`` (1 ms where not given)."""
    figures = [{"part": "stages", "what": what, "median_ms": ms.get(what, 1.0), "schedule": schedule, "stage": stage,
                "impl": impl, "note": ""} for what, schedule, stage, impl in STAGES]
    figures.append({"part": "stages", "what": "paper early stage, explicit", "median_ms": 9.0, "schedule": "dagger",
                    "stage": "early", "impl": "explicit", "note": "the plan of 'paper early stage, explicit': timed once"})
    figures.append({"part": "map-layer", "what": "SDPA self-attention, 64 tokens", "median_ms": 0.1})
    return {"spec": spec.name, "batch": spec.batch, "precision": spec.precision, "cost_device": "H200 SXM",
            "gpu": "NVIDIA H200",
            "figures": figures}


#: (what, schedule, stage, impl) of the stages part's calls, the stock UNet first
STAGES = [("stock UNet", None, None, None)] + [(f"paper {stage} stage, {impl}", "paper", stage, impl)
                                               for stage in ("early", "main") for impl in ("explicit", "kernels")]


@pytest.fixture(scope="module")
def calls(cost_check):
    """tiny-sdxl's calls as ``--fit --measured`` reads them from a bench (priced on the H200)."""
    spec = load_spec("tiny-sdxl")
    return cost_check.measured_calls(cost_check.MetaUNet(spec), device("h200"), _bench(spec, {}))


@pytest.fixture(scope="module")
def measured(calls):
    """The same calls as if they took 1.6 × roofline + 3 µs per kernel."""
    return [dataclasses.replace(c, measured_ms=c.ms(1.6, 3.0)) for c in calls]


def test_the_fit_finds_the_split_the_calls_were_made_with(cost_check, calls, measured):
    # a plan timed once and the map layer's figures are not calls of their own
    assert [c.what for c in calls] == [what for what, *_ in STAGES]
    assert all(c.kernels > 0 and c.roofline_ms > 0 for c in calls)
    assert cost_check.least_squares(measured) == pytest.approx((1.6, 3.0), rel=1e-6)
    rows = {a: b for label, a, b in cost_check.fit_rows(measured) if label == "the stock UNet"}
    assert rows[1.0] > rows[1.5] > rows[2.0] >= 0  # more per FLOP, less per kernel: the stock UNet is fitted exactly
    stock = measured[0]
    assert stock.ms(1.5, rows[1.5]) == pytest.approx(stock.measured_ms)


def test_the_fit_keeps_the_roofline_a_floor(cost_check, measured):
    """Calls faster than the roofline says would fit a < 1; the bounded fit stays at a = 1."""
    faster = [dataclasses.replace(c, measured_ms=c.ms(0.5, 4.0)) for c in measured]
    a, b = cost_check.least_squares(faster)
    assert a == 1.0 and b >= 0


def test_a_free_map_layer_is_priced_below_the_kernels_and_above_the_stock_unet(cost_check):
    """The ceiling row: the kernels' main stage with the map layer swapped for the stock self-attention."""
    spec = load_spec("tiny-sdxl")
    meta = cost_check.MetaUNet(spec)
    main = next(stage for stage, _ in cost_check.schedule_stages(spec, "paper") if stage.name == "main")
    dev = device("h200")
    kernels, free = cost_check.priced("k", meta.stage(main, "kernels"), dev), cost_check.priced("f", meta.map_layer_free(main), dev)
    stock = cost_check.priced("s", meta.stock(), dev)
    assert free.kernels < kernels.kernels and free.roofline_ms < kernels.roofline_ms
    assert free.kernels >= stock.kernels and free.roofline_ms < stock.roofline_ms  # its ops and the gathers, on fewer tokens


def test_a_report_is_priced_on_the_gpu_that_ran_it(cost_check):
    assert cost_check.device_key({"cost_device": "H200 SXM", "gpu": "NVIDIA H200"}) == "h200"
    assert cost_check.device_key({"cost_device": None, "gpu": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert cost_check.device_key({"cost_device": "this machine (CPU, measured)", "gpu": "x86_64"}) is None


def _fit(report: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--fit", "--measured", str(report)], capture_output=True,
                          text=True, cwd=ROOT)


def test_the_cli_refuses_what_is_not_a_bench_report(tmp_path, cost_check):
    report = tmp_path / "gpu-bench.json"
    report.write_text(json.dumps({"spec": "tiny-sdxl", "batch": 1, "precision": "fp32", "figures": [],
                                  "gpu": "NVIDIA H100 80GB HBM3"}))
    done = _fit(report)
    assert done.returncode != 0 and "no 'stock UNet'" in done.stderr and "Traceback" not in done.stderr
    report.write_text("{")
    with pytest.raises(SystemExit, match="expected a gpu-bench.json"):
        cost_check.read_bench(report)


@pytest.mark.slow
def test_the_cli_fits_a_report(tmp_path, calls):
    report = tmp_path / "gpu-bench.json"
    report.write_text(json.dumps(_bench(load_spec("tiny-sdxl"), {c.what: c.ms(1.25, 6.0) for c in calls})))
    done = _fit(report)
    assert done.returncode == 0, done.stderr
    last = done.stdout.splitlines()[3].rstrip(" ┃").rsplit("┃", 1)[-1]  # the header's second line, last column
    assert last.strip() == "a 1.25, b 6.00 µs"  # least squares finds what the report was made with
    table = subprocess.run([sys.executable, str(TOOL), "--spec", "tiny-sdxl", "--launch-us", "0", "11.5"],
                           capture_output=True, text=True, cwd=ROOT)  # the tool's first table, beside the fit
    assert table.returncode == 0, table.stderr
    assert "map layer, 256 tokens" in table.stdout and "11.5 µs" in table.stdout
