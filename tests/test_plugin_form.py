"""The plugin form of a pruned graph: the map layer as the Triton kernels' ``atedm`` nodes (``kernels/nodes.py``).

onnxruntime runs the plugin form with each node going through its ``torch.ops.atedm`` op (``onnxruntime_ops.py``),
the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py); the portable form runs as
standard ops. On a block whose first layer's query and key projections are scaled by ``PEAK`` (row entropy of the
head-mean map asserted under 0.7 of ``log N``), both forms and the eager explicit path give the same output, and the
plugin form's nodes keep the explicit path's tokens and recovery sources.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from atedm_export.cli import main
from atedm_export.kernels.nodes import DOMAIN, NODE_TYPES, plugin_form
from atedm_export.kernels.onnxruntime_ops import plugin_nodes, session_model, session_options
from atedm_export.kernels.runnable import TRITON_INSTALLED
from atedm_export.buildfolder import first_view, read_manifest, check_files
from atedm_export.pruning import AtedmOptions
from atedm_export.pruning import atedm as atedm_module

from .conftest import BlockGraph, needs_rtx, peaked_block

PEAK = 6.0
ROOT = Path(__file__).resolve().parents[1]
has_triton = pytest.mark.skipif(not TRITON_INSTALLED, reason="triton not installed")


def _eager_selection(graph: BlockGraph, feed: tuple[torch.Tensor, ...], monkeypatch) -> dict:  # noqa: ANN001
    """The explicit path's kept tokens, recovery sources and map, recorded as the eager block runs."""
    seen: dict = {}

    def recording(name: str, function):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = function(*args, **kwargs)
            seen[name] = out
            return out
        return wrapped

    monkeypatch.setattr(atedm_module, "select", recording("select", atedm_module.select))
    monkeypatch.setattr(atedm_module, "map_sources", recording("sources", atedm_module.map_sources))
    monkeypatch.setattr(atedm_module, "self_attention_map", recording("map", atedm_module.self_attention_map))
    with torch.no_grad():
        seen["output"] = graph(*feed)
    return seen


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` with intermediate tensors as outputs too (onnxruntime returns only graph outputs)."""
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


@has_triton
def test_the_plugin_form_keeps_the_explicit_paths_tokens_and_output(tiny_unet, monkeypatch, tmp_path):
    graph, height, width = peaked_block(tiny_unet, AtedmOptions(), PEAK)
    gen = torch.Generator().manual_seed(0)
    feed = (torch.randn(2, graph.block.in_channels, height, width, generator=gen), torch.randn(2, 77, 64, generator=gen))
    eager = _eager_selection(graph, feed, monkeypatch)
    attn_map = eager["map"][1].attn_map
    entropy = float(-(attn_map * attn_map.clamp_min(1e-30).log()).sum(-1).mean() / math.log(attn_map.shape[-1]))
    print(f"row entropy {entropy:.3f} of log N")
    assert entropy < 0.7, f"the maps are not peaked (row entropy {entropy:.3f} of log N)"

    names = {"input_names": ["hidden", "context"], "output_names": ["out"], "opset_version": 18}
    with torch.no_grad(), plugin_form():
        program = torch.onnx.export(graph, feed, dynamo=True, optimize=False, **names)
    with torch.no_grad():
        torch.onnx.export(graph, feed, str(tmp_path / "portable.onnx"), dynamo=False, **names)
    model = program.model_proto
    onnx.checker.check_model(model)
    nodes = plugin_nodes(model)
    assert sorted(n.op_type for n in nodes) == ["AttentionLse", "HeadMeanMap", "RecoverySources", "SelectKept"]
    selected = next(n for n in nodes if n.op_type == "SelectKept")
    assert not [n for n in model.graph.node if n.op_type == "TopK"]  # the selection kernel finds the k-th largest
    keep = next(a for a in selected.attribute if a.name == "keep")
    assert len(selected.input) == 1 and keep.i == 95
    sources = next(n for n in nodes if n.op_type == "RecoverySources")

    inputs = {"hidden": feed[0].numpy(), "context": feed[1].numpy()}
    plugin = onnxruntime.InferenceSession(
        session_model(_with_outputs(model, [selected.output[0], sources.output[0]])).SerializeToString(),
        session_options(np.dtype(np.float32), tmp_path), providers=["CPUExecutionProvider"])
    out, kept, source = plugin.run(None, inputs)
    portable = onnxruntime.InferenceSession(str(tmp_path / "portable.onnx"), providers=["CPUExecutionProvider"])
    expected = portable.run(None, inputs)[0]

    eager_kept, _ = eager["select"]
    assert np.array_equal(kept, eager_kept.numpy())
    assert np.array_equal(source, eager["sources"].numpy())
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out, eager["output"].numpy(), atol=1e-5, rtol=0)


def test_the_plugin_form_is_refused_where_the_kernels_do_not_compute_the_map(tmp_path):
    runner = CliRunner()
    tome = runner.invoke(main, ["build", "tiny-sdxl-tome", "--backend", "onnx", "--plugin-form",
                                "--out", str(tmp_path / "tome")])
    assert tome.exit_code != 0 and "has no map layer" in tome.output and tome.output.count("\n") == 1, tome.output
    spec = tmp_path / "max.yaml"
    spec.write_text("name: max-heads\nmodel: tiny-sdxl\nheight: 256\nprecision: fp32\nsteps: 4\nschedule: paper\n"
                    "pruning:\n  heads: max\n")
    heads = runner.invoke(main, ["build", str(spec), "--backend", "onnx", "--plugin-form", "--out", str(tmp_path / "m")])
    assert heads.exit_code != 0 and "heads 'max'" in heads.output, heads.output
    assert not (tmp_path / "tome").exists() and not (tmp_path / "m").exists()


@pytest.mark.slow
@has_triton
def test_build_writes_the_plugin_form_and_verify_runs_it_against_the_portable_form(tmp_path):
    out = tmp_path / "plugin"
    built = CliRunner().invoke(main, ["build", "tiny-sdxl", "--backend", "onnx", "--plugin-form", "--stages", "main",
                                      "--out", str(out)])
    assert built.exit_code == 0, built.output
    assert "plugin form: the map layer as 44 atedm nodes" in built.output
    manifest = read_manifest(out)
    main_stage = first_view(manifest).graph("main")
    assert first_view(manifest).baseline.plugin_onnx is None and main_stage.plugin_onnx is not None
    check_files(manifest, out)  # the plugin form's sha256 is checked with every other file
    model = onnx.load(str(out / main_stage.plugin_onnx.path), load_external_data=False)
    assert {o.domain for o in model.opset_import} >= {DOMAIN}
    assert all(t.external_data[0].value == manifest.weights.path.split("/")[-1]
               for t in model.graph.initializer if t.external_data)  # the build's one weights file, not a copy

    verified = CliRunner().invoke(main, ["verify", str(out), "--json"])
    assert verified.exit_code == 0, verified.output
    import json

    checks = json.loads(verified.output)["checks"]
    plugin = [c for c in checks if c["backend"] == "onnxruntime-plugin"]
    assert [c["graph"] for c in plugin] == ["main"] and plugin[0]["reference"] == "portable"
    assert plugin[0]["passed"] and plugin[0]["max_abs"] < 1e-5

    inspected = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    main_row = next(g for g in inspected["graphs"] if g["name"] == "main")
    assert set(main_row["forms"]) == {"portable", "plugin"}
    assert inspected["attention"]["main"]["plugin_nodes"] == 44


@needs_rtx
def test_tensorrt_rtx_engines_carry_the_portable_form_and_say_why(tiny_engine_build):
    engine = read_manifest(tiny_engine_build).engine
    assert engine.library == "tensorrt-rtx" and engine.form == "portable"
    assert "no plugin layer" in engine.form_reason


def test_each_tensorrt_plugin_describes_its_node_and_launches_the_kernel_torch_launches():
    """``compile/plugins.py`` called as ``tensorrt.plugin`` calls it (``tests/plugin_check.py``), kernels compiled for
    sm90: each plugin's outputs are its op's, its kernel the op's entry kernel with the torch launcher's grid, sizes
    and warps, and the kernel's parameters are its node's inputs, sizes and outputs then triton's two scratch
    pointers, which it never reads (no scratch bytes), so TensorRT's launch, which passes no scratch, is safe."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.plugin_check", "sm90"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["plugin"] for r in rows] == [f"{DOMAIN}::{t}" for t in NODE_TYPES.values()]
    names = {"HALF": "torch.float16", "FLOAT": "torch.float32", "INT64": "torch.int64"}
    for r in rows:
        assert r["registered"], r
        assert [[shape, names[dtype]] for shape, dtype in r["outputs"]] == r["expected_outputs"], r
        assert r["grid"] == r["expected_grid"] + [1] * (3 - len(r["expected_grid"])), r
        assert r["extra"] == r["expected_extra"] and r["block_x"] == 32 * r["warps"], r
        assert r["kernel"].endswith("_node") and r["scratch_bytes"] == [0, 0], r
        assert r["entry_params"] == r["inputs"] + len(r["extra"]) + len(r["outputs"]) + 2, r


def test_the_plugins_use_only_what_tensorrt_plugin_exports():
    """Every ``trtp.<name>`` compile/plugins.py uses is public in the framework's own sources (the TensorRT 11.4
    bindings' ``tensorrt/plugin``, unpacked by tools/setup.sh), and every attribute it sets on a launch is one
    ``KernelLaunchParams`` has."""
    sources = ROOT / ".venv" / "trt-plugin" / "plugin"
    if not (sources / "_lib.py").is_file():
        pytest.skip("tensorrt.plugin's sources are not unpacked (tools/setup.sh)")
    public, launch_fields = set(), set()
    for path in sources.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "id", "") == "public_api" for d in node.decorator_list):
                public.add(node.name)
            if isinstance(node, ast.ClassDef) and node.name == "KernelLaunchParams":
                init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
                launch_fields = {a.arg for a in init.args.args[1:]}
            if isinstance(node, ast.ClassDef) and node.name == "SymIntExprs":
                assert any(isinstance(n, ast.FunctionDef) and n.name == "from_tuple" for n in node.body)
    mine = ROOT / "atedm_export" / "compile" / "plugins.py"
    used = {n.attr for n in ast.walk(ast.parse(mine.read_text()))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "trtp"}
    assert used and used <= public, used - public
    assert {"grid_x", "grid_y", "grid_z", "block_x", "shared_mem"} <= launch_fields
