"""Selection at TensorRT's TopK limit: a 64×64 block keeping 37% and 95% (3891 > 3840) of 4096 tokens.

The real AT-EDM block (tiny-sdxl's first attention block, fed a 64×64 grid) is exported alone to ONNX,
checked against eager in onnxruntime, and parsed and built by TensorRT-RTX for sm89. At 37% it selects
with ``TopK`` (k = 1516), at 95% by rank (k = 3891, past TopK's limit). A block forced to a plain
``torch.topk`` selection at 95% is built too, to show the limit the rank formulation avoids.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from atedm_export.pruning import StagePlan, apply_pruning, select

rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None, reason="TensorRT-RTX not installed")
GRID = 64
NAME = "down_blocks.1.attentions.0"


class Block(torch.nn.Module):
    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.block(hidden, encoder_hidden_states=context, return_dict=False)[0]


def _export(tiny_unet, keep: int, path) -> tuple[Block, tuple[torch.Tensor, torch.Tensor]]:
    apply_pruning(tiny_unet, StagePlan({NAME: keep}))
    module = Block(tiny_unet.get_submodule(NAME)).eval()
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 64, GRID, GRID, generator=gen), torch.randn(1, 77, 64, generator=gen))
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17)
    return module, args


def _build(path) -> tuple[bool, str]:
    from atedm_export.compile import BuildOptions, load_library
    from atedm_export.compile.library import EngineBuildError

    try:
        load_library("tensorrt-rtx").build(path, path.with_suffix(".plan"), BuildOptions(targets=("sm89",)))
    except EngineBuildError as exc:
        return False, str(exc)
    return True, ""


@pytest.mark.parametrize("ratio", [0.37, 0.95])
def test_selection_exports_exactly_at_any_keep(tiny_unet, tmp_path, ratio):
    keep = round(ratio * GRID * GRID)
    path = tmp_path / "block.onnx"
    module, args = _export(tiny_unet, keep, path)
    model = onnx.load(str(path))
    assert ("TopK" in {n.op_type for n in model.graph.node}) == (keep <= select.TOPK_LIMIT)
    constants = [*model.graph.initializer,
                 *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")]
    tokens = GRID * GRID  # the exporter folds constants: no [N, N] mask may come out of that (16 MB here)
    assert max(int(np.prod(t.dims)) for t in constants) < tokens * tokens // 64
    with torch.no_grad():
        want = module(*args).numpy()
    session = ort.InferenceSession(str(path))
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()], (a.numpy() for a in args))))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@rtx
@pytest.mark.parametrize("ratio", [0.37, 0.95])
def test_selection_builds_with_tensorrt_rtx(tiny_unet, tmp_path, ratio):
    path = tmp_path / "block.onnx"
    _export(tiny_unet, round(ratio * GRID * GRID), path)
    built, reason = _build(path)
    assert built, reason


@rtx
def test_topk_selection_would_not_build_above_3840(tiny_unet, tmp_path, monkeypatch):
    def topk_indices(scores: torch.Tensor, keep: int, how: str) -> torch.Tensor:
        return scores.topk(keep, dim=1).indices

    monkeypatch.setattr("atedm_export.pruning.atedm.select_tokens", topk_indices)
    path = tmp_path / "topk.onnx"
    _export(tiny_unet, round(0.95 * GRID * GRID), path)
    assert "TopK" in {n.op_type for n in onnx.load(str(path)).graph.node}
    built, reason = _build(path)
    assert not built and "3840" in reason


@rtx
def test_engine_builder_errors_come_back_from_its_process(tmp_path):
    """The builder runs in a child process; its one-line errors (and a crash) reach the build as errors."""
    from onnx import TensorProto, helper

    from atedm_export.compile import BuildOptions, build_isolated, load_library
    from atedm_export.compile.library import EngineBuildError

    library = load_library("tensorrt-rtx")
    options = BuildOptions(targets=("sm89",))
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="strange")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(EngineBuildError, match="bad.onnx: ONNX parser: node 'strange' \\(NoSuchOp\\)"):
        build_isolated(library, path, tmp_path / "bad.plan", options)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model")
    with pytest.raises(EngineBuildError, match="garbage.onnx: not an ONNX model"):
        build_isolated(library, garbage, tmp_path / "garbage.plan", options)
    assert not (tmp_path / "bad.plan").exists() and not (tmp_path / "garbage.plan").exists()
