"""The map layer's Triton kernels (``atedm_export/kernels``) keep the explicit path's tokens, everywhere they run.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py) on CPU tensors;
every kernel is also compiled ahead of time for sm80, sm89 and sm90, so a kernel that cannot compile for a GPU
fails here. The comparisons (``tools/kernel_agreement.py``) run the product's own explicit and kernels paths on
the same fp16 projections of a layer whose query and key projections are scaled until the maps are peaked (row
entropy 0.44-0.61 of ``log N`` at ``PEAK``, asserted under 0.7): the same kept tokens and recovery sources, except
where two candidates lie within the paths' rounding of each other (counted and required to be explained).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atedm_export.errors import KernelUnavailable, PlanError
from atedm_export.kernels.runnable import TRITON_INSTALLED
from atedm_export.pruning import AtedmOptions, StagePlan, apply_pruning
from atedm_export.pruning.attention import resolve_map_impl
from atedm_export.pruning.recover import recovery_sources
from atedm_export.pruning.select import topk_keep_indices

from .conftest import run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kernel_agreement import FULL_SHAPES, TEST_SHAPES, compare  # noqa: E402

PEAK = 6.0
has_triton = pytest.mark.skipif(not TRITON_INSTALLED, reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _assert_agrees(result) -> None:  # noqa: ANN001
    assert result.entropy < 0.7, f"maps not peaked enough: row entropy {result.entropy:.2f} of log N"
    assert result.map_error < 1e-5 and result.score_error < 1e-4, result
    assert result.kept_unexplained == 0 and result.sources_unexplained == 0, result
    assert result.kept_differ == 0, result  # at these maps the boundary gap is far above the rounding


@has_triton
@pytest.mark.parametrize(("tokens", "channels", "heads"), TEST_SHAPES)
def test_kernels_keep_the_explicit_paths_tokens_and_sources(tokens, channels, heads):
    batch = 2 if tokens == min(t for t, _, _ in TEST_SHAPES) else 1  # one shape at batch 2: the batch offsets
    _assert_agrees(compare(tokens, channels, heads, peak=PEAK, batch=batch))


@has_triton
def test_the_mapless_form_keeps_the_same_tokens_and_sources():
    """G-WPR as attention with swapped roles and recovery from q, k and lse: no map in memory, the same tokens."""
    _assert_agrees(compare(*TEST_SHAPES[3], peak=PEAK, batch=1, mapless=True))  # batch offsets: the opcheck test


def test_the_kernels_write_the_map_up_to_a_gib_and_no_map_past_it():
    from atedm_export.kernels.ops import materializes

    assert materializes(2, 4096, 4096)  # SDXL's 64×64 blocks at 1024², batch 2: 128 MiB
    assert not materializes(2, 16384, 16384)  # SDXL at 2048² (and SD 1.5 at 1024²): 2 GiB


def test_the_kernel_modules_import_no_module_that_imports_them_back():
    """``kernels/``' modules import each other one way (top-level and in-function imports alike): no cycle."""
    import ast

    folder = ROOT / "atedm_export" / "kernels"
    imports = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names.update([node.module] if node.module else [alias.name for alias in node.names])
        imports[path.stem] = names & {p.stem for p in folder.glob("*.py")}

    def reaches(start: str, seen: tuple[str, ...]) -> None:
        for module in imports[start]:
            assert module not in seen, f"import cycle: {' -> '.join((*seen, module))}"
            reaches(module, (*seen, module))

    for module in imports:
        reaches(module, (module,))
    assert "outputs" in imports["ops"] and "outputs" in imports["triton_kernels"] and not imports["outputs"] - {"tiles"}


@has_triton
def test_kernels_agree_on_near_uniform_maps_and_in_fp32():
    flat = compare(256, 1280, 20, peak=1.0, batch=1)
    assert flat.entropy > 0.99 and flat.kept_unexplained == 0 and flat.sources_unexplained == 0, flat
    _assert_agrees(compare(200, 640, 8, peak=PEAK, batch=1, dtype=torch.float32))


@has_triton
def test_the_ops_pass_torchs_custom_op_checks():
    """Schema, fake (meta) implementations and their agreement with the real ones: what torch.compile relies on."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 2, 16, generator=gen) for _ in range(3))
    torch.library.opcheck(torch.ops.atedm.attention_lse, (q, k, v, 0.25))
    out, lse = torch.ops.atedm.attention_lse(q, k, v, 0.25)
    torch.library.opcheck(torch.ops.atedm.head_mean_map, (q, k, lse, 0.25))
    attn_map, column_sums = torch.ops.atedm.head_mean_map(q, k, lse, 0.25)
    torch.testing.assert_close(column_sums.sum(dim=1), attn_map.mean(dim=1), atol=1e-6, rtol=1e-5)
    scores = torch.rand(2, 40, generator=gen)
    torch.library.opcheck(torch.ops.atedm.select_kept, (scores, 15))
    kept, slot_of = torch.ops.atedm.select_kept(scores, 15)
    assert torch.equal(kept, topk_keep_indices(scores, 15))
    torch.library.opcheck(torch.ops.atedm.recovery_sources, (attn_map, kept, slot_of))
    torch.testing.assert_close(torch.ops.atedm.recovery_sources(attn_map, kept, slot_of), recovery_sources(attn_map, kept))
    torch.library.opcheck(torch.ops.atedm.gwpr_step, (q, k, lse, scores, 0.25))
    torch.testing.assert_close(torch.ops.atedm.gwpr_step(q, k, lse, scores, 0.25).mean(dim=1),
                               (scores.unsqueeze(1) @ attn_map).squeeze(1), atol=1e-6, rtol=1e-5)
    torch.library.opcheck(torch.ops.atedm.recovery_mapless, (q, k, lse, kept, slot_of, 0.25))
    assert torch.equal(torch.ops.atedm.recovery_mapless(q, k, lse, kept, slot_of, 0.25),
                       torch.ops.atedm.recovery_sources(attn_map, kept, slot_of))
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.25)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


@has_triton
def test_each_launcher_takes_its_ops_scalars_in_the_schemas_order():
    """The launcher pairs an op's scalar arguments with names (``Launch.scalars``): they must be the schema's."""
    from atedm_export.kernels import ops
    from atedm_export.kernels.triton_kernels import LAUNCHES

    for name, launch in LAUNCHES.items():
        assert list(launch.scalars) == ops.tensor_and_scalar_names(name)[1], name


@has_triton
def test_the_selection_kernel_keeps_topks_set_ties_included():
    """Few distinct score values: ties at the k-th largest, which the lower indices win on both paths."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        tokens = int(torch.randint(2, 300, (1,), generator=gen))
        keep = int(torch.randint(1, tokens + 1, (1,), generator=gen))
        levels = int(torch.randint(1, 6, (1,), generator=gen))
        scores = torch.randint(0, levels, (2, tokens), generator=gen).float() / levels
        kept, slot_of = torch.ops.atedm.select_kept(scores, keep)
        assert torch.equal(kept, topk_keep_indices(scores, keep)), (trial, tokens, keep)
        want = torch.full_like(slot_of, -1).scatter(1, kept, torch.arange(keep).expand_as(kept))
        assert torch.equal(slot_of, want), (trial, tokens, keep)


def _lowest_index_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The reference kept set for any k: a stable descending sort puts tied tokens in index order."""
    return scores.sort(dim=1, descending=True, stable=True).indices[:, :keep].sort(dim=1).values


@has_triton
def test_the_selection_kernel_finds_the_kth_largest_itself_past_topks_limit():
    """SDXL 2048²'s blocks (16,384 tokens, 37% kept: 6,062 > TensorRT's TopK limit of 3,840), with ties, negative
    scores, infinities and both zeros (−0 equals +0, as the comparison of floats has it)."""
    gen = torch.Generator().manual_seed(1)
    tokens = 16384
    scores = torch.randint(-50, 50, (2, tokens), generator=gen).float() / 7
    scores[0, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0])
    scores[1] = torch.where(torch.rand(tokens, generator=gen) < 0.5, -0.0, 0.0)  # only zeros: keep the lowest indices
    for keep in (6062, 12000):  # the k-th largest positive, then negative
        kept, slot_of = torch.ops.atedm.select_kept(scores, keep)
        assert torch.equal(kept, _lowest_index_top(scores, keep)), keep
        assert torch.equal(kept[1], torch.arange(keep))
        want = torch.full_like(slot_of, -1).scatter(1, kept, torch.arange(keep).expand_as(kept))
        assert torch.equal(slot_of, want), keep


@has_triton
def test_the_pruned_unet_on_kernels_equals_the_explicit_path(tiny_unet, tiny_blocks, tiny_inputs):
    keep = {b.name: round(0.37 * b.tokens) for b in tiny_blocks}
    want = run(apply_pruning(tiny_unet, StagePlan(keep, AtedmOptions(map_impl="explicit"))), tiny_inputs)
    got = run(apply_pruning(tiny_unet, StagePlan(keep, AtedmOptions(map_impl="kernels"))), tiny_inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@has_triton
def test_the_pruned_unet_on_kernels_compiles_to_one_graph(tiny_unet, tiny_blocks, tiny_inputs):
    """``torch.compile(fullgraph=True)``: dynamo traces the whole pruned UNet, the kernels as opaque custom ops
    (their fake implementations give the shapes), with no graph break (42 s here with ``aot_eager``)."""
    keep = {b.name: round(0.37 * b.tokens) for b in tiny_blocks}
    unet = apply_pruning(tiny_unet, StagePlan(keep, AtedmOptions(map_impl="kernels")))
    want = run(unet, tiny_inputs)
    got = run(torch.compile(unet, backend="aot_eager", fullgraph=True), tiny_inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_auto_is_explicit_on_cpu_and_every_export_is_explicit(monkeypatch):
    cpu = torch.empty(1)
    assert resolve_map_impl("auto", "mean", 1, cpu) == "explicit"
    assert resolve_map_impl("kernels", "mean", 1, torch.empty(1, device="meta")) == "kernels"  # the cost model's
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert resolve_map_impl("kernels", "mean", 1, cpu) == "explicit"


def test_auto_on_cuda_without_triton_warns_and_runs_explicit(monkeypatch):
    from atedm_export.kernels import runnable

    monkeypatch.setattr(runnable, "TRITON_INSTALLED", False)
    with pytest.warns(RuntimeWarning, match="map_impl 'auto' on CUDA without OpenAI's triton"):
        assert not runnable.auto_takes_kernels(torch.device("cuda"))
    assert runnable.why_not(torch.device("cuda")).startswith("map_impl 'kernels' needs OpenAI's triton package")


def test_kernels_on_cpu_without_the_interpreter_is_one_line(monkeypatch, tiny_unet, tiny_blocks):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    plan = StagePlan({tiny_blocks[0].name: 10}, AtedmOptions(map_impl="kernels"))
    with pytest.raises(KernelUnavailable, match=r"^map_impl 'kernels' runs on CUDA tensors, or on CPU tensors in "
                                                r"Triton's interpreter \(set TRITON_INTERPRET=1.*; got cpu tensors") as err:
        apply_pruning(tiny_unet, plan)
    assert "\n" not in str(err.value)
    with pytest.raises(PlanError, match="map_impl 'kernels' needs heads 'mean' and map_pool 1"):
        AtedmOptions(map_impl="kernels", heads="max")
    assert AtedmOptions().map_impl == "auto"


def test_every_kernel_compiles_ahead_of_time_for_sm80_sm89_sm90():
    """``triton.compile`` for each target with no GPU (what CI and the TensorRT plugin rely on), no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "atedm_export.kernels.aot", "--json"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    kernels = ("attention_lse", "head_mean_map", "recovery_sources", "select_kept", "gwpr_step", "recovery_mapless")
    assert {(r["kernel"], r["target"]) for r in rows} == {(k, t) for k in kernels for t in ("sm80", "sm89", "sm90")}
    for r in rows:
        assert r["spills"] == 0 and 0 < r["registers"] <= 255 and r["cubin_bytes"] > 0, r
        assert r["shared_bytes"] <= 99 * 1024, r  # within sm89's 99 KB a block (sm80: 163 KB, sm90: 227 KB)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("tokens", "channels", "heads"), FULL_SHAPES)
def test_on_the_gpu_the_kernels_keep_the_explicit_paths_tokens(tokens, channels, heads):
    _assert_agrees(compare(tokens, channels, heads, peak=PEAK, batch=2, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_on_the_gpu_the_pruned_unet_replays_from_a_cuda_graph(tiny_unet, tiny_blocks, tiny_inputs):
    unet = tiny_unet.to("cuda", torch.float16)
    def on_gpu(value):  # noqa: ANN001, ANN202 - a tensor, a dict of them, or anything else
        if isinstance(value, dict):
            return {key: on_gpu(v) for key, v in value.items()}
        if torch.is_tensor(value):
            return value.to("cuda", torch.float16 if value.is_floating_point() else value.dtype)
        return value

    inputs = on_gpu(tiny_inputs)
    keep = {b.name: round(0.37 * b.tokens) for b in tiny_blocks}
    want = run(apply_pruning(unet, StagePlan(keep, AtedmOptions(map_impl="explicit"))), inputs)
    apply_pruning(unet, StagePlan(keep, AtedmOptions()))  # auto: the kernels on CUDA
    eager = run(unet, inputs)
    torch.testing.assert_close(eager.float(), want.float(), atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            unet(**inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = unet(**inputs).sample
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed, eager)
