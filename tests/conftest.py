"""Shared fixtures: a tiny SDXL-shaped UNet saved and reloaded the way a user's checkpoint is."""

from __future__ import annotations

import pytest
import torch

from atedm_export.models import attention_blocks, example_inputs, load_unet, unet_inputs

TINY_HW = 256


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
    return example_inputs(unet_inputs(dict(tiny_unet.config), 2, TINY_HW, TINY_HW, 77), seed=1)


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample
