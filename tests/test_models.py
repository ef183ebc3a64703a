from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from atedm_export import models
from atedm_export.errors import ModelError
from atedm_export.models import SDXL_BASE_CONFIG, attention_blocks, build_unet, load_unet, unet_config

from .conftest import run


def _layout(blocks):
    return [(b.name, b.layers) for b in blocks]


def test_sdxl_base_on_meta_is_the_sdxl_unet():
    unet = build_unet(SDXL_BASE_CONFIG, device="meta")
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    blocks = attention_blocks(unet, 1024, 1024)
    assert len(blocks) == 11
    assert {b.tokens for b in blocks if b.layers == 2} == {64 * 64}
    assert {b.tokens for b in blocks if b.layers == 10} == {32 * 32}
    assert sum(b.layers == 10 for b in blocks) == 6


def test_tiny_has_sdxl_topology_and_is_small(tiny_unet, tiny_blocks):
    assert sum(p.numel() for p in tiny_unet.parameters()) < 20_000_000
    sdxl = attention_blocks(build_unet(SDXL_BASE_CONFIG, device="meta"), 1024, 1024)
    assert _layout(tiny_blocks) == _layout(sdxl)
    assert {b.tokens for b in tiny_blocks} == {16 * 16, 8 * 8}


def test_builtin_weights_are_seeded():
    a, b, c = (load_unet("tiny-sdxl", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.conv_in.weight, b.conv_in.weight)
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)


def test_local_folder_with_and_without_unet_subfolder(tiny_dir, tiny_unet, tiny_inputs):
    bare = load_unet(str(tiny_dir / "unet"))
    assert torch.equal(run(bare, tiny_inputs), run(tiny_unet, tiny_inputs))
    assert unet_config(str(tiny_dir))["block_out_channels"] == [32, 64, 96]


def test_single_safetensors_file_in_diffusers_layout(tmp_path, tiny_unet, tiny_inputs):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_unet.state_dict().items()}, str(path))
    loaded = load_unet(str(path))
    assert torch.equal(run(loaded, tiny_inputs), run(tiny_unet, tiny_inputs))


def test_load_in_half_precision(tiny_dir):
    assert load_unet(str(tiny_dir), dtype=torch.float16).dtype == torch.float16


def test_pickle_weights_are_refused(tmp_path, tiny_dir):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="never loaded"):
        load_unet(str(ckpt))
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "unet" / "config.json").read_text())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="no .safetensors"):
        load_unet(str(folder))


def test_missing_path_and_unreachable_hub_fail_fast(monkeypatch, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_unet(str(tmp_path / "nope.safetensors"))
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(ModelError, match="local diffusers folder"):
        load_unet("nobody/no-such-model-atedm")
    assert time.monotonic() - start < 10


def test_non_sdxl_unet_without_attention_blocks_is_refused():
    config = {
        **models.TINY_SDXL_CONFIG,
        "down_block_types": ["DownBlock2D"] * 3,
        "up_block_types": ["UpBlock2D"] * 3,
        "mid_block_type": None,
    }
    unet = build_unet(config)
    with pytest.raises(ModelError, match="no Transformer2DModel"):
        attention_blocks(unet, 256, 256)
