"""Shared fixtures: a tiny SDXL-shaped UNet saved and reloaded the way a user's checkpoint is."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# The map layer's Triton kernels run on CPU tensors in Triton's interpreter, which triton reads when the kernels
# are defined (their first use, after this): on a machine without CUDA every kernel test runs them there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from atedm_export.buildfolder import FileEntry, first_view, sha256
from atedm_export.contract import GraphContract
from atedm_export.models import attention_blocks, load_unet
from atedm_export.pruning import AtedmOptions, StagePlan, set_plan

TINY_HW = 256
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def tool(name: str):  # noqa: ANN201 - a module
    """``tools/<name>.py`` imported, once (registered before it runs: its dataclasses look their module up by name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """tiny-sdxl with seeded random weights, written with ``save_pretrained`` as a pipeline folder."""
    root = tmp_path_factory.mktemp("tiny-pipeline")
    load_unet("tiny-sdxl", seed=0).save_pretrained(root / "unet")
    return root


@pytest.fixture()
def tiny_unet(tiny_dir):
    """A fresh copy each test, loaded through the same code path as a user's diffusers folder."""
    return load_unet(str(tiny_dir))


@pytest.fixture(scope="session")
def tiny_blocks(tiny_dir):
    return attention_blocks(load_unet(str(tiny_dir)), TINY_HW, TINY_HW)


@pytest.fixture()
def tiny_inputs(tiny_unet):
    contract = GraphContract.from_config(dict(tiny_unet.config), 2, TINY_HW, TINY_HW)
    return contract.unet_kwargs(contract.example_feed(seed=1))


def sample_loop(model, scheduler, contract: GraphContract, steps: int, seed: int = 3,  # noqa: ANN001
                device: str = "cpu") -> torch.Tensor:
    """A sampler loop over ``model(sample, t, ...) -> .sample`` (a UNet or a StagedUNet, told the run's
    timesteps): what a pipeline or a custom sampler does with its UNet. Returns the final latents."""
    scheduler.set_timesteps(steps)
    if hasattr(model, "set_timesteps"):
        model.set_timesteps(scheduler.timesteps)
    cond = contract.unet_kwargs(contract.example_feed(seed=seed, device=device))
    latents = cond["sample"] * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(latents, t), t, cond["encoder_hidden_states"],
                    added_cond_kwargs=cond.get("added_cond_kwargs")).sample
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


class BlockGraph(torch.nn.Module):
    """One attention block as a graph: image tokens and text in, the block's output out."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.block(hidden, encoder_hidden_states=context).sample


def peaked_block(unet: torch.nn.Module, options: AtedmOptions, peak: float) -> tuple[BlockGraph, int, int]:
    """The first 16×16 block of the tiny UNet pruned to 95 of 256 tokens with ``options``, its first layer's query and
    key projections scaled by ``peak`` (peaked maps, on which the ranking matters); with its height and width."""
    blocks = attention_blocks(unet, 256, 256)
    chosen = blocks[0]
    set_plan(unet, StagePlan({chosen.name: 95}, options, {b.name: b.tokens for b in blocks}))
    block = unet.get_submodule(chosen.name)
    first = block.transformer_blocks[0].attn1
    with torch.no_grad():
        first.to_q.weight.mul_(peak)
        first.to_k.weight.mul_(peak)
    return BlockGraph(block).eval(), chosen.height, chosen.width


HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX (tensorrt-rtx-cu13-bindings) not installed")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory):
    """The tiny spec built once per session: its ONNX graphs and shared weights (~80 s), no engines."""
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import load_spec

    out = tmp_path_factory.mktemp("builds") / "tiny"
    build(BuildRequest(load_spec("tiny-sdxl"), out, library="onnx"))
    return out


#: The ToMe build the eval and method tests share: the size and steps of tests/test_eval.py's AT-EDM builds.
TOME_SPEC = {"name": "tiny-sd15-tome", "model": "tiny-sd15", "height": 128, "width": 128, "precision": "fp32",
             "steps": 4, "method": "tome", "schedule": "uniform-63"}


@pytest.fixture(scope="session")
def tiny_tome_build(tmp_path_factory: pytest.TempPathFactory):
    """tiny-sd15 with static ToMe (tomesd's defaults: self-attention merged), 63% of every block's tokens merged:
    one stage, ONNX graphs only (~20 s), at 128 px: its smallest block (2x2 tokens) merges every source token."""
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import parse_spec

    out = tmp_path_factory.mktemp("builds") / "tiny-tome"
    build(BuildRequest(parse_spec(dict(TOME_SPEC)), out, library="onnx"))
    return out


#: Three static shapes in one build (two resolutions, two batch sizes), one stage: 6 graphs, one weights file.
MULTI_SPEC = {"name": "tiny-sd15-multi", "model": "tiny-sd15", "precision": "fp32", "steps": 4,
              "schedule": "uniform-63", "shapes": [{"batch": 2, "height": 128, "width": 128},
                                                   {"batch": 2, "height": 128, "width": 192},
                                                   {"batch": 4, "height": 128, "width": 128}]}


@pytest.fixture(scope="session")
def tiny_multi_build(tmp_path_factory: pytest.TempPathFactory):
    """tiny-sd15 at three shapes (MULTI_SPEC), ONNX graphs only."""
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import parse_spec

    out = tmp_path_factory.mktemp("builds") / "tiny-multi"
    build(BuildRequest(parse_spec(dict(MULTI_SPEC)), out, library="onnx"))
    return out


@pytest.fixture(scope="session")
def tiny_engine_build(tmp_path_factory: pytest.TempPathFactory):
    """The tiny spec with TensorRT-RTX engines for sm89: every stage parsed and built ahead of time by the real
    library (~3 minutes of builder on 2 cores, so its tests are in the slow suite, which CI runs too)."""
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import load_spec

    if not HAS_RTX:
        pytest.skip("TensorRT-RTX (tensorrt-rtx-cu13-bindings) not installed")
    out = tmp_path_factory.mktemp("builds") / "tiny-engines"
    build(BuildRequest(load_spec("tiny-sdxl"), out, library="tensorrt-rtx", targets=("sm89",)))
    return out


@pytest.fixture(scope="session")
def gpu_engine_build(tmp_path_factory):
    """tiny-sdxl (fp32, every stage) with engines for this GPU, plans keeping their weights (gpu tests only)."""
    from atedm_export.build import BuildRequest, build
    from atedm_export.compile import EngineUnavailable, load_library
    from atedm_export.spec import load_spec

    major, minor = torch.cuda.get_device_capability()
    local = f"sm{major}{minor}"
    reasons = []
    for backend, targets in (("tensorrt", ()), ("tensorrt-rtx", (local,))):
        try:
            library = load_library(backend)
        except EngineUnavailable as exc:
            reasons.append(str(exc))
            continue
        if library.api.ahead_of_time and local not in library.targets():
            reasons.append(f"{backend} does not target {local}")
            continue
        out = tmp_path_factory.mktemp("gpu-engines") / backend
        build(BuildRequest(load_spec("tiny-sdxl"), out, library=backend, targets=targets, strip_weights=False))
        return out
    pytest.skip("no engine library runs on this GPU: " + "; ".join(reasons))


@pytest.fixture(scope="session")
def ort_repo(tiny_build, tmp_path_factory):
    """The tiny build deployed as a Triton repository, onnxruntime variant (CPU servers)."""
    from atedm_export.deploy.repository import DeployRequest, deploy

    repo = tmp_path_factory.mktemp("deploy") / "repo"
    deploy(DeployRequest(tiny_build, repo, variant="onnxruntime"))
    return repo


def corrupted_copy(build, copy, graph: str):  # noqa: ANN001, ANN201 - paths
    """A copy of ``build`` whose ``graph``'s ONNX file has its last bytes changed (size kept): only its
    sha256 can tell, which every loader must check."""
    import shutil

    from atedm_export.buildfolder import read_manifest

    shutil.copytree(build, copy)
    path = copy / first_view(read_manifest(copy, verify=False)).graph(graph).onnx.path
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    return copy


def small_spec(tmp_path, **changes) -> str:
    """A one-stage spec (uniform-63) on tiny-sd15: two graphs to export instead of three, each in a third of
    tiny-sdxl's time, for the tests of build mechanics that any model exercises."""
    import yaml

    data = {"name": "small", "model": "tiny-sd15", "height": 256, "width": 256, "precision": "fp32",
            "steps": 10, "schedule": "uniform-63", **changes}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``ATEDM_REQUIRE_GPU=1`` (what tools/gpu-check.sh sets): a gpu test fails where it would skip for want of a GPU."""

    if item.get_closest_marker("gpu") and os.environ.get("ATEDM_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
        pytest.fail("ATEDM_REQUIRE_GPU=1 but torch sees no CUDA GPU", pytrace=False)


# --- LoRAs of tiny-sd15 and the builds made with them (tests/test_lora.py, tests/test_refit.py) ---------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in: a 1x1 Conv2d in SD 1.5's blocks


def _peft_lora(seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA of tiny-sd15 with random A and B (PEFT's ``init_lora_weights=False``), PEFT's keys."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = load_unet("tiny-sd15", seed=0)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def _save_diffusers(folder, state: dict[str, torch.Tensor]):  # noqa: ANN001, ANN202
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state))
    return folder / "pytorch_lora_weights.safetensors"


def _save_kohya(path, state: dict[str, torch.Tensor], alpha: float = 4.0):  # noqa: ANN001, ANN202
    """kohya/A1111 names for the same weights: ``lora_unet_<module_path>.lora_down/lora_up.weight`` and ``alpha``."""
    from safetensors.torch import save_file

    kohya = {}
    for key, value in state.items():
        module, _, rest = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if rest.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(kohya, str(path))
    return path


@pytest.fixture(scope="session")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    state = _peft_lora(seed=5)
    (folder / "style").mkdir()
    (folder / "other").mkdir()
    return {"style": _save_diffusers(folder / "style", state), "kohya": _save_kohya(folder / "kohya.safetensors", state),
            "other": _save_diffusers(folder / "other", _peft_lora(seed=7)), "state": state, "folder": folder}


@pytest.fixture(scope="session")
def lora_build(loras, tmp_path_factory):
    """The ToMe spec with the LoRA in it (×0.8), its baseline graph only (schedule none: one graph to export)."""
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import parse_spec

    out = tmp_path_factory.mktemp("lora-builds") / "with-lora"
    spec = {**TOME_SPEC, "name": "with-lora", "schedule": "none", "loras": [f"{loras['style']}:0.8"]}
    build(BuildRequest(parse_spec(spec), out, library="onnx"))
    return out


@pytest.fixture(scope="session")
def refitted(tiny_tome_build, loras, tmp_path_factory):
    """The ToMe build refitted with the LoRA (×0.8): its folder and ``RefitResult``."""
    from atedm_export.refit import RefitRequest, refit
    from atedm_export.spec import LoraSpec

    out = tmp_path_factory.mktemp("refits") / "refitted"
    result = refit(RefitRequest(tiny_tome_build, (LoraSpec(file=str(loras["style"]), scale=0.8),), out))
    return out, result


def with_fake_engines(build, folder, **engine) -> None:  # noqa: ANN001
    """A copy of ``build`` whose manifest lists a plan per graph (a few bytes each; the runtime never opens them here)."""
    shutil.copytree(build, folder)
    data = json.loads((folder / "manifest.json").read_text())
    (folder / "engines").mkdir(exist_ok=True)
    for shape in data["shapes"]:
        for graph in (shape["baseline"], *shape["stages"]):
            plan = folder / "engines" / f"{graph['name']}.plan"
            plan.write_bytes(b"plan of " + graph["name"].encode())
            graph["engine"] = FileEntry(path=f"engines/{plan.name}", sha256=sha256(plan), bytes=plan.stat().st_size).model_dump()
    data["engine"] = {"library": "tensorrt-rtx", "module": "tensorrt_rtx_bindings", "version": "1.0", "targets": ["sm89"],
                      **engine}
    (folder / "manifest.json").write_text(json.dumps(data))
