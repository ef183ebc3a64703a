"""The build's shared weights file: each tensor once, page-aligned, read back exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from atedm_export.weights import ALIGN, MappedWeights, WeightStore, external_tensors


def _model(tensors: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in tensors]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"{n}_out", onnx.TensorProto.FLOAT, None)
                                              for n in tensors],
                              [numpy_helper.from_array(array, name) for name, array in tensors.items()])
    return helper.make_model(graph)


def test_identical_tensors_are_stored_once_and_aligned(tmp_path):
    rng = np.random.default_rng(0)
    weight, other = rng.standard_normal((64, 33)).astype(np.float32), rng.standard_normal(700).astype(np.float32)
    small = np.ones(4, np.float32)  # under INLINE_BYTES: stays in the graph
    first = _model({"a.weight": weight, "small": small})
    second = _model({"renamed.weight": weight.copy(), "b": other})
    with WeightStore(tmp_path / "weights.onnx.data") as store:
        store.move_initializers(first, tmp_path)
        store.move_initializers(second, tmp_path)
        assert store.reused == weight.nbytes
    spans = {t.name: t for m in (first, second) for t in external_tensors(m)}
    assert set(spans) == {"a.weight", "renamed.weight", "b"}
    assert spans["a.weight"].offset == spans["renamed.weight"].offset
    assert all(t.offset % ALIGN == 0 and t.location == "weights.onnx.data" for t in spans.values())
    padded = -(-weight.nbytes // ALIGN) * ALIGN
    assert (tmp_path / "weights.onnx.data").stat().st_size == padded + other.nbytes  # the weight once, then b
    for model, name, want in ((second, "renamed.weight", weight), (second, "b", other)):
        path = tmp_path / "g.onnx"
        onnx.save(model, str(path))
        loaded = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in onnx.load(str(path)).graph.initializer}
        np.testing.assert_array_equal(loaded[name], want)
        mapped = MappedWeights(path, model)
        pointers = {n: size for n, _, size in mapped.pointers()}
        assert pointers[name] == want.nbytes
        mapped.close()
