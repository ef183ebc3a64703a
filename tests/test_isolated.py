"""Heavy build steps run in a process of their own: results, peak memory and errors come back."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from atedm_export.errors import AtedmError
from atedm_export.isolated import run_isolated


class StepError(AtedmError):
    pass


def double(value: int) -> int:
    return 2 * value


def allocate(megabytes: int) -> int:
    block = bytearray(megabytes << 20)
    return len(block)


def fail(message: str) -> None:
    raise AtedmError(message)


def fill_the_disk() -> None:
    raise OSError(errno.ENOSPC, "No space left on device", "/build/onnx/weights.onnx.data")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash() -> None:
    raise RuntimeError("a bug")


def test_result_and_peak_memory_come_back():
    small = run_isolated(double, 21)
    assert small.result == 42 and small.peak_rss > 0
    big = run_isolated(allocate, 300)
    assert big.result == 300 << 20
    assert big.peak_rss - small.peak_rss > 250 << 20  # the child's own peak, not the parent's


@pytest.mark.parametrize(("function", "message"), [
    (fail, "main: simulated"),
    (fill_the_disk, "No space left on device (/build/onnx/weights.onnx.data)"),
    (die, "the export process was killed by SIGKILL (out of memory?)"),
    (crash, "the export process failed (exit 1): RuntimeError: a bug"),
])
def test_errors_come_back_as_one_line(function, message):
    args = ("main: simulated",) if function is fail else ()
    with pytest.raises(StepError) as caught:
        run_isolated(function, *args, error=StepError, what="export")
    assert str(caught.value) == message


@pytest.mark.slow
def test_a_graph_exported_in_its_own_process_matches_one_exported_here(tmp_path):
    """What a full-size build does (``export_stage`` over ``ISOLATE_BYTES``), on the tiny model."""
    import onnx

    from atedm_export.build import export_stage
    from atedm_export.models import build_unet, unet_config
    from atedm_export.spec import load_spec

    spec = load_spec("tiny-sdxl")
    shapes = spec.contract(dict(build_unet(unet_config(spec.model), device="meta").config))
    (tmp_path / "child").mkdir()
    (tmp_path / "here").mkdir()
    peak = export_stage(spec, None, shapes, tmp_path / "child" / "raw.onnx", weight_bytes=1 << 40)
    assert peak is not None and peak > 100 << 20
    assert export_stage(spec, None, shapes, tmp_path / "here" / "raw.onnx", weight_bytes=0) is None
    child, here = (onnx.load(str(tmp_path / d / "raw.onnx")) for d in ("child", "here"))
    assert [n.op_type for n in child.graph.node] == [n.op_type for n in here.graph.node]
    assert [t.name for t in child.graph.initializer] == [t.name for t in here.graph.initializer]
