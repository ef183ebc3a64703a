"""Every model family end to end on its tiny architecture: contract, method, build, runtime, pipeline, files.

The tiny models are saved with ``save_pretrained`` (or as original-layout single files) and loaded through
the code a user's checkpoint goes through. The default suite holds what runs in seconds (contract, method,
presets, single files, refusals, full-size FLOPs); the builds end to end, every family's pruned graph
through TensorRT-RTX and the served requests run in the slow suite, which CI runs too.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from atedm_export.buildfolder import first_view
from atedm_export import families
from atedm_export.cli import main
from atedm_export.contract import GraphContract
from atedm_export.dsap import ROLES, load_preset, resolve, stage_plan
from atedm_export.errors import AtedmError, ModelError
from atedm_export.families import FAMILIES, Family, family_named, family_of
from atedm_export.flops import count_flops, graph_flops
from atedm_export.models import BUILTIN_CONFIGS, attention_blocks, build_unet, load_unet
from atedm_export.pruning import AtedmOptions, StagePlan, planned
from atedm_export.runtime import StagedUNet

from .conftest import HAS_RTX
from .test_triton_server import install  # noqa: F401 - the server install fixture
from .ldm_layout import to_original

TINY = ["tiny-sdxl", "tiny-sd15", "tiny-sd21", "tiny-sdxl-refiner", "tiny-ssd1b"]
FAMILY = {"tiny-sdxl": "sdxl", "tiny-sd15": "sd", "tiny-sd21": "sd", "tiny-sdxl-refiner": "sdxl-refiner",
          "tiny-ssd1b": "sdxl", "sdxl-base": "sdxl", "sdxl-refiner": "sdxl-refiner", "sd15": "sd", "sd21": "sd",
          "ssd-1b": "sdxl", "segmind-vega": "sdxl"}
HW = 256
SERVED = ["tiny-sd15", "tiny-sdxl-refiner"]
NEW_FAMILIES = ["tiny-sd15", "tiny-sdxl-refiner", "tiny-sd21", "tiny-ssd1b"]  # tiny-sdxl: the default suite's build


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny family saved as a complete diffusers pipeline folder, as a user's model is, once per module."""
    from atedm_export.runtime.pipeline import tiny_pipeline

    folders = {}

    def save(model: str):
        if model not in folders:
            root = tmp_path_factory.mktemp(model)
            tiny_pipeline(model, load_unet(model, seed=0)).save_pretrained(root, safe_serialization=True)
            folders[model] = root
        return folders[model]

    return save


@pytest.mark.parametrize("model", list(FAMILY))
def test_each_builtin_is_recognized_as_its_family(model):
    assert family_of(BUILTIN_CONFIGS[model]).name == FAMILY[model]


# --- the family records ------------------------------------------------------------------------------


def test_the_registry_lists_each_family_once_and_each_builtin_in_one_family():
    assert list(FAMILIES) == [f.name for f in FAMILIES.values()] == ["sd", "sdxl-refiner", "sdxl"]
    assert len({id(f) for f in FAMILIES.values()}) == len(FAMILIES)
    owned = [b.name for f in FAMILIES.values() for b in f.builtins]
    assert sorted(owned) == sorted(BUILTIN_CONFIGS) == sorted(FAMILY)
    assert all(family_named(name) is f for name, f in FAMILIES.items())
    with pytest.raises(ModelError, match="unknown model family 'sd3'; known: sd, sdxl-refiner, sdxl"):
        family_named("sd3")


def test_the_old_names_are_the_registered_records():
    from atedm_export import contract

    assert (contract.SD, contract.SDXL, contract.SDXL_REFINER) == (families.SD, families.SDXL, families.SDXL_REFINER)
    assert contract.SD is FAMILIES["sd"] and contract.family_of is family_of and contract.Family is Family


@pytest.mark.parametrize("model", list(FAMILY))
def test_family_of_a_builtin_is_the_record_that_owns_it(model):
    found = family_of(BUILTIN_CONFIGS[model])
    assert found.builtin(model) is not None and found.builtin(model).config is BUILTIN_CONFIGS[model]


def test_a_family_registered_twice_is_refused():
    registry: dict = {}
    tiny = families.Builtin("tiny-other", BUILTIN_CONFIGS["tiny-sd15"])
    other = replace(families.SD, name="other", builtins=(tiny,))
    assert families.register(other, registry) is other and list(registry) == ["other"]
    with pytest.raises(ValueError, match="model family 'other' is already registered"):
        families.register(other, registry)
    with pytest.raises(ValueError, match="built-in 'tiny-other' of model family 'again' is already registered"):
        families.register(replace(other, name="again"), registry)
    assert list(registry) == ["other"]
    with pytest.raises(ValueError, match="model family 'sd' is already registered"):
        families.register(replace(families.SD, builtins=()))
    assert list(FAMILIES) == ["sd", "sdxl-refiner", "sdxl"]


def test_a_family_whose_builtins_read_as_an_earlier_one_is_refused():
    """SDXL's reading accepts every text_time config, so the refiner must register before it."""
    registry: dict = {}
    families.register(replace(families.SDXL, builtins=()), registry)
    refiner = families.Builtin("tiny-r", BUILTIN_CONFIGS["tiny-sdxl-refiner"])
    with pytest.raises(ValueError, match="built-in 'tiny-r' reads as model family 'sdxl', not 'sdxl-refiner'"):
        families.register(replace(families.SDXL_REFINER, builtins=(refiner,)), registry)


def test_the_widths_the_pipeline_reads_come_from_the_record():
    sdxl, refiner = BUILTIN_CONFIGS["sdxl-base"], BUILTIN_CONFIGS["sdxl-refiner"]
    assert families.SDXL.add_embedding_width(sdxl) == sdxl["projection_class_embeddings_input_dim"] == 2816
    assert (families.SDXL.pooled_dim(sdxl), families.SDXL_REFINER.pooled_dim(refiner)) == (1280, 1280)
    sd15 = BUILTIN_CONFIGS["sd15"]
    assert families.SD.add_embedding_width(sd15) == families.SD.pooled_dim(sd15) == 0
    with pytest.raises(ModelError, match="without integer projection_class_embeddings_input_dim"):
        family_of({k: v for k, v in sdxl.items() if k != "addition_time_embed_dim"})


def test_pipeline_guidance_and_vae_scaling_are_read_from_the_record():
    from atedm_export.runtime.pipeline import _pipeline_class, tiny_components, tiny_pipeline

    assert {n: f.guidance for n, f in FAMILIES.items()} == {"sd": 7.5, "sdxl": 5.0, "sdxl-refiner": 5.0}
    pipe = tiny_pipeline("tiny-sd21")
    assert type(pipe).__name__ == families.SD.pipeline == "StableDiffusionPipeline"
    assert pipe.vae.config.scaling_factor == families.SD.vae_scaling == 0.18215
    assert pipe.scheduler.config.prediction_type == families.SD.prediction_type_of("tiny-sd21") == "v_prediction"
    assert families.SD.prediction_type_of("tiny-sd15") == "epsilon" and pipe.safety_checker is None
    variant = replace(families.SDXL, pipeline="StableDiffusionXLInpaintPipeline", vae_scaling=0.5)
    assert _pipeline_class(variant).__name__ == "StableDiffusionXLInpaintPipeline"
    parts = tiny_components(variant, BUILTIN_CONFIGS["tiny-sdxl"], "tiny-sdxl")
    assert parts["vae"].config.scaling_factor == 0.5
    assert parts["text_encoder_2"].config.projection_dim == families.SDXL.pooled_dim(BUILTIN_CONFIGS["tiny-sdxl"])


def test_the_contract_follows_the_family():
    sd = GraphContract.from_config(BUILTIN_CONFIGS["sd15"], 2, 512, 512)
    assert [(t.name, t.shape) for t in sd.inputs] == [
        ("sample", (2, 4, 64, 64)), ("timestep", (2,)), ("encoder_hidden_states", (2, 77, 768))]
    refiner = GraphContract.from_config(BUILTIN_CONFIGS["sdxl-refiner"], 2, 1024, 1024, precision="fp16")
    assert {t.name: t.shape for t in refiner.inputs}["time_ids"] == (2, 5)
    assert {t.name: t.shape for t in refiner.inputs}["text_embeds"] == (2, 1280)
    assert refiner.time_ids() == [1024.0, 1024.0, 0.0, 0.0, 6.0]
    base = GraphContract.from_config(BUILTIN_CONFIGS["sdxl-base"], 2, 1024, 1024, precision="fp16")
    assert {t.name: t.shape for t in base.inputs}["text_embeds"] == (2, 1280)
    assert {t.name: t.dtype for t in base.inputs} == {
        "sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16", "text_embeds": "float16",
        "time_ids": "float16"}
    assert [t.name for t in base.outputs] == ["latent"]


@pytest.mark.parametrize("model", TINY)
def test_attn1_and_layer_prune_points_give_the_same_output(saved, model):
    unet = load_unet(str(saved(model)))
    blocks = attention_blocks(unet, HW, HW)
    contract = GraphContract.from_config(dict(unet.config), 2, HW, HW)
    inputs = contract.unet_kwargs(contract.example_feed(seed=2))
    keep = {b.name: max(1, round(0.37 * b.tokens)) for b in blocks}
    outputs, flops = {}, {}
    for point in ("layer", "attn1"):
        plan = StagePlan(keep, AtedmOptions(prune_point=point))
        with planned(unet, plan), torch.no_grad():
            outputs[point] = unet(**inputs).sample
        flops[point] = count_flops(build_unet(dict(unet.config), device="meta"), HW, HW, 77, plan)
    torch.testing.assert_close(outputs["attn1"], outputs["layer"], atol=1e-5, rtol=0)
    assert flops["attn1"] < flops["layer"]


def test_attn1_is_the_default_where_it_is_exact():
    assert AtedmOptions().prune_point == "attn1"
    assert AtedmOptions(recovery="skip").prune_point == "layer"
    assert AtedmOptions(importance="cross").prune_point == "layer"


def _export_flops(unet, plan, tmp_path, name):
    import onnx

    from atedm_export.export import cleanup, export_raw

    contract = GraphContract.from_config(dict(unet.config), 2, HW, HW)
    raw = tmp_path / name / "raw.onnx"
    raw.parent.mkdir()
    export_raw(unet, plan, contract, raw)
    onnx.save(cleanup(onnx.load(str(raw))), str(raw.parent / "clean.onnx"))  # shapes folded, as a build saves it
    return graph_flops(str(raw.parent / "clean.onnx"), 2)


@pytest.mark.slow
@pytest.mark.parametrize("model", TINY[1:])
def test_the_prune_points_differ_in_flops_counted_from_the_graphs(saved, model, tmp_path):
    unet = load_unet(str(saved(model)))
    keep = {b.name: max(1, round(0.37 * b.tokens)) for b in attention_blocks(unet, HW, HW)}
    counted = {p: _export_flops(unet, StagePlan(keep, AtedmOptions(prune_point=p)), tmp_path, p)
               for p in ("layer", "attn1")}
    assert counted["attn1"] < counted["layer"]


@pytest.mark.slow
def test_presets_name_blocks_by_role_in_every_family():
    for model in ("sdxl-base", "sd15", "sdxl-refiner", "ssd-1b"):
        config = BUILTIN_CONFIGS[model]
        blocks = attention_blocks(build_unet(config, device="meta"), config["sample_size"] * 8, config["sample_size"] * 8)
        early, main_stage = (stage_plan(s, blocks) for s in load_preset("paper").stages)
        assert len(main_stage.keep) == len(blocks)
        tokens = {b.name: b.tokens for b in blocks}
        spared = set(resolve("@down-first", tokens)) | set(resolve("@up-last", tokens))
        assert set(early.keep) == {b.name for b in blocks} - spared and spared
        finest = max(b.tokens for b in blocks)
        dagger_main = stage_plan(load_preset("dagger").stages[1], blocks)
        assert {b.name for b in blocks if b.name not in dagger_main.keep} == {b.name for b in blocks if b.tokens == finest}
    sdxl = {b.name: b.tokens for b in attention_blocks(build_unet(BUILTIN_CONFIGS["sdxl-base"], device="meta"), 1024, 1024)}
    assert resolve("@down-first", sdxl) == ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0"]
    assert resolve("@up-last", sdxl) == ["up_blocks.0.attentions.2", "up_blocks.1.attentions.2"]
    assert set(ROLES) >= {"down-first", "up-last", "finest"}


@pytest.mark.parametrize("model", TINY)
def test_original_layout_single_files_load_as_their_family(model, tmp_path):
    unet = build_unet(BUILTIN_CONFIGS[model], seed=5)
    path = tmp_path / f"{model}.safetensors"
    save_file(to_original(unet.state_dict(), BUILTIN_CONFIGS[model]), str(path))
    loaded = load_unet(str(path))
    assert family_of(dict(loaded.config)).name == FAMILY[model]
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_a_single_file_of_an_unknown_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(path))
    with pytest.raises(ModelError, match=r"original layout, 1 tensors\) does not hold the weights of a known UNet"):
        load_unet(str(path))


def test_unets_the_method_cannot_serve_are_refused_in_one_line(tmp_path):
    no_attention = {**BUILTIN_CONFIGS["tiny-sd15"], "down_block_types": ["DownBlock2D"] * 4,
                    "up_block_types": ["UpBlock2D"] * 4, "mid_block_type": "UNetMidBlock2D"}
    with pytest.raises(ModelError, match="no Transformer2DModel attention blocks"):
        attention_blocks(build_unet(no_attention, device="meta"), HW, HW)
    with pytest.raises(ModelError, match="addition_embed_type='image'.*supported"):
        family_of({**BUILTIN_CONFIGS["tiny-sdxl"], "addition_embed_type": "image"})
    with pytest.raises(ModelError, match="class_embed_type='timestep'"):
        family_of({**BUILTIN_CONFIGS["tiny-sd15"], "class_embed_type": "timestep"})
    folder = tmp_path / "plain"
    build_unet(no_attention).save_pretrained(folder / "unet")
    spec = tmp_path / "plain.yaml"
    spec.write_text(json.dumps({"model": str(folder), "height": HW, "width": HW, "precision": "fp32"}))
    result = CliRunner().invoke(main, ["build", str(spec), "--backend", "onnx", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no Transformer2DModel attention blocks" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl-refiner", "ssd-1b"])
def test_flops_prints_per_stage_savings_of_full_size_families(name):
    result = CliRunner().invoke(main, ["flops", name, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["name"] for s in report["stages"]] == ["early", "main"]
    early, main_stage = report["stages"]
    assert 0 < early["saving"] < main_stage["saving"] < 0.7
    assert report["height"] == {"sd15": 512, "sdxl-refiner": 1024, "ssd-1b": 1024}[name]


# --- end to end --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_build(saved, tmp_path_factory):
    """Each family's tiny model built (ONNX graphs) from its saved pipeline folder, once per module."""
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import load_spec

    builds = {}

    def make(model: str):
        if model not in builds:
            spec = load_spec(model).model_copy(update={"model": str(saved(model))})
            out = tmp_path_factory.mktemp("family-builds") / model
            build(BuildRequest(spec, out, library="onnx"))
            builds[model] = out
        return builds[model]

    return make


def _pipeline_calls_on_both_backends(build, image=None) -> list[tuple[str, float]]:
    """The family's pipeline on onnxruntime, each UNet call also run eagerly on the same inputs.

    Calls are compared one by one rather than whole trajectories: random tiny weights give near-uniform
    attention, so G-WPR scores nearly tie, and a 1e-6 difference may flip which of two tied tokens is
    kept at some step; both trajectories are then right and drift apart.
    """
    from atedm_export.runtime import load_backend
    from atedm_export.runtime.pipeline import load_pipeline

    staged = StagedUNet.load(build, backend="onnxruntime")
    eager = load_backend("eager", build)
    calls, run = [], staged.backend.run

    def both(graph: str, feed: dict) -> torch.Tensor:
        out = run(graph, feed)
        calls.append((graph, float((out - eager.run(graph, feed)).abs().max())))
        return out

    staged.backend.run = both
    size = {"image": image, "strength": 0.5} if image is not None else {"height": HW, "width": HW}
    load_pipeline(staged)("a red fox", num_inference_steps=10, output_type="latent",
                          generator=torch.Generator().manual_seed(1), **size)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("model", NEW_FAMILIES)
def test_family_builds_verifies_and_runs_its_pipeline(family_build, model, tmp_path):
    build = family_build(model)
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["spec"]["pruning"]["prune_point"] == "attn1"
    verified = CliRunner().invoke(main, ["verify", str(build)])
    assert verified.exit_code == 0, verified.output

    image = None
    if FAMILY[model] == "sdxl-refiner":
        image = tmp_path / "input.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (HW, HW, 3), dtype=np.uint8)).save(image)
    calls = _pipeline_calls_on_both_backends(build, Image.open(image) if image else None)
    expected = ["main"] * 5 if image else ["early"] + ["main"] * 9  # the refiner redoes the last half of 10 steps
    assert [graph for graph, _ in calls] == expected
    # Random tiny weights give near-uniform maps, so one call may keep the other of two near-tied tokens
    # (measured: tiny-sd15's last call differs by 0.11 while the other nine agree within 1.5e-6). Every
    # other call must agree.
    diffs = sorted(diff for _, diff in calls)
    assert diffs[-2] < 1e-4, calls

    args = ["generate", str(build), "-p", "a red fox", "--steps", "4", "-o", str(tmp_path / "out.png")]
    result = CliRunner().invoke(main, args + (["--image", str(image)] if image else []))
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (HW, HW, 3)


def test_refiner_builds_refine_an_image_and_say_so(tmp_path):
    from atedm_export.contract import SD, SDXL_REFINER
    from atedm_export.runtime.pipeline import _input_image

    with pytest.raises(AtedmError, match="refines an image: pass --image"):
        _input_image(SDXL_REFINER, None, HW, HW)
    (tmp_path / "in.png").write_bytes(b"not an image")
    with pytest.raises(AtedmError, match="cannot read image .*in.png: not a file PIL can open"):
        _input_image(SDXL_REFINER, tmp_path / "in.png", HW, HW)
    with pytest.raises(AtedmError, match="--image is for SDXL refiner builds"):
        _input_image(SD, tmp_path / "in.png", HW, HW)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX (tensorrt-rtx-cu13-bindings) not installed")
@pytest.mark.parametrize("model", NEW_FAMILIES)
def test_every_familys_pruned_graph_builds_with_tensorrt_rtx(family_build, model, tmp_path):
    """The main stage's graph (every block pruned) of each family parses and builds for sm89 on this CPU."""
    from atedm_export.compile import BuildOptions, build_isolated, load_library

    build = family_build(model)
    built = build_isolated(load_library("tensorrt-rtx"), build / "onnx" / "main.onnx", tmp_path / "main.plan",
                           BuildOptions(targets=("sm89",)))
    assert built.result > 0 and (tmp_path / "main.plan").stat().st_size > 1 << 20


@pytest.mark.slow
@pytest.mark.parametrize("model", SERVED)
def test_family_deploys_and_a_served_loop_equals_the_local_one(family_build, install, model, tmp_path):
    from atedm_export.deploy.client import connect
    from atedm_export.deploy.repository import DeployRequest, deploy
    from atedm_export.deploy.server import TritonServer

    from .test_runtime import _denoise

    build = family_build(model)
    repo = tmp_path / "repo"
    deploy(DeployRequest(build, repo, variant="onnxruntime"))
    with TritonServer(repo, install=install) as server:
        served = connect(server.grpc_url)
        local = StagedUNet.load(build, backend="onnxruntime")
        assert served.manifest == local.manifest
        assert first_view(served.manifest).input_names == [t.name for t in local.contract.inputs]
        got, want = _denoise(served, 10), _denoise(local, 10)
    assert torch.equal(got, want)
    assert [s.calls for s in served.stats.values()] == [1, 9]


def test_tiny_pipelines_depend_on_the_seed_alone():
    from atedm_export.runtime.pipeline import tiny_pipeline

    first = tiny_pipeline("tiny-sdxl", seed=3)
    torch.rand(1000)  # whatever ran before must not change the weights
    second = tiny_pipeline("tiny-sdxl", seed=3)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
