"""Thin adapters over torchmetrics: one place that knows each metric's library, input range and files.

Why torchmetrics: one maintained implementation of every metric the paper and its readers quote (PSNR, SSIM,
LPIPS, CLIP score, FID, KID), each a streaming ``Metric`` (``update`` per batch, ``compute`` once), so 30k
images never sit in memory at once, and the same numbers other tools report for the same features. What it
would download on its own (torch-fidelity's Inception, a hub CLIP) is replaced here by files the user names:
an eval runs offline, and which network scored the images is part of the report.

Inputs: images as ``uint8 [N, 3, H, W]`` tensors (what a PNG holds). Fidelity metrics read them as floats in
[0, 1]; CLIP takes them as they are (its processor resizes and normalizes); the Inception network gets them
resized to 299×299 beforehand with PIL's bicubic filter (clean-fid's "clean" resize: ``score.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import AtedmError, first_line
from ..runtime.quiet import quiet_libraries

#: KID's default subset size (torchmetrics, after Bińkowski et al.): a set of fewer images uses all of them.
KID_SUBSET_SIZE = 1000
#: The side the Inception network of FID and KID reads.
INCEPTION_SIZE = 299


def as_unit_float(images: Tensor) -> Tensor:
    """``uint8`` images as floats in [0, 1], what PSNR, SSIM and LPIPS (``normalize=True``) read."""
    return images.to(torch.float32) / 255.0


# --- fidelity to the unpruned images: PSNR, SSIM, LPIPS ------------------------------------------------------------


class Fidelity:
    """PSNR, SSIM and (where its network loads) LPIPS of one image set against the unpruned set, per batch.

    PSNR is the set's: ``10·log10(1 / MSE)`` with the mean squared error over every pixel of every image
    (torchmetrics' ``PeakSignalNoiseRatio`` accumulating over batches), so it is infinite only when every
    image equals its unpruned twin. SSIM is the mean of the per-image SSIMs (Gaussian 11×11 window); LPIPS
    the mean of the per-image distances (AlexNet features, lower is closer).
    """

    def __init__(self, lpips: Any = None, device: torch.device | str = "cpu") -> None:  # noqa: ANN401 - LPIPS
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        self.device = torch.device(device)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0).to(self.device)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(self.device)
        self.lpips = lpips
        if lpips is not None:
            lpips.reset()

    def update(self, images: Tensor, unpruned: Tensor) -> None:
        """One batch of ``uint8`` images and their unpruned twins (same prompt and seed), in the same order."""
        pred, target = as_unit_float(images).to(self.device), as_unit_float(unpruned).to(self.device)
        with quiet_libraries():
            self.psnr.update(pred, target)
            self.ssim.update(pred, target)
            if self.lpips is not None:
                self.lpips.update(pred, target)

    def compute(self) -> dict[str, float]:
        with quiet_libraries():
            values = {"psnr": float(self.psnr.compute()), "ssim": float(self.ssim.compute())}
            if self.lpips is not None:
                values["lpips"] = float(self.lpips.compute())
        return values


def load_lpips(device: torch.device | str = "cpu") -> tuple[Any, str | None]:  # noqa: ANN401
    """torchmetrics' LPIPS (AlexNet) where it loads offline, else ``(None, why)`` in one line.

    LPIPS needs torchvision for the AlexNet backbone and its ImageNet weights, which torchvision would download
    on first use; the linear heads ship inside torchmetrics. An eval never downloads: the weights must already
    be in torch's hub cache (``torch.hub.get_dir()/checkpoints``). Without torchvision (which cannot be installed
    beside every torch build) or the weights, the other metrics still run and the report says why LPIPS is absent.
    """
    try:
        import torchvision
    except ImportError:
        return None, "LPIPS skipped: it needs torchvision (AlexNet features), which is not installed here"
    try:
        weights = torchvision.models.AlexNet_Weights.DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file():
            return None, (f"LPIPS skipped: torchvision's AlexNet weights are not in {cached.parent} and an eval does "
                          f"not download; fetch {weights.url} there to score LPIPS")
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        with quiet_libraries():
            return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device), None
    except Exception as exc:  # noqa: BLE001 - any failure of an optional metric is a note, never the run's end
        return None, f"LPIPS skipped: {first_line(exc)}"


# --- prompt alignment: CLIP score -------------------------------------------------------------------------------------


class _ClipEmbeddings(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return the embedding tensors torchmetrics' CLIP score expects.

    transformers 5 returns an output object (the projected embedding in ``pooler_output``) where earlier
    versions, and torchmetrics 1.9, expect the tensor itself; either way the score sees the tensor.
    """

    def __init__(self, model: Any) -> None:  # noqa: ANN401 - transformers.CLIPModel
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output: Any) -> Tensor:  # noqa: ANN401
        return output if isinstance(output, Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(path: Path, device: torch.device | str = "cpu") -> Any:  # noqa: ANN401 - torchmetrics CLIPScore
    """torchmetrics' ``CLIPScore`` on a transformers CLIP checkpoint folder (``--clip PATH``), loaded offline.

    The folder holds what ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained`` write (config,
    weights, tokenizer, image processor): the paper's OpenCLIP ViT-g/14 is published in this form as
    ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``. The score is torchmetrics' ``100 · max(cos(image, text), 0)``,
    averaged over the images; captions past the text encoder's length are cut to it.
    """
    if not path.is_dir():
        raise AtedmError(f"--clip {path}: no such folder; expected a transformers CLIP checkpoint folder "
                         "(config.json, weights, tokenizer and preprocessor files)")
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def loader() -> tuple[Any, Any]:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
        return _ClipEmbeddings(model), CLIPProcessor.from_pretrained(str(path), local_files_only=True)

    try:
        with quiet_libraries():
            return CLIPScore(model_name_or_path=loader).to(device)
    except Exception as exc:  # noqa: BLE001 - a user's folder can fail in as many ways as transformers has loaders
        raise AtedmError(f"--clip {path}: cannot load a CLIP checkpoint from it: {first_line(exc)}") from None


def clip_update(clip: Any, images: Tensor, prompts: list[str]) -> None:  # noqa: ANN401
    """Add one batch of ``uint8`` images and the prompts they were drawn from to a CLIP score."""
    device = next(clip.model.parameters()).device
    with quiet_libraries(), torch.no_grad():
        clip.update(list(images.to(device)), prompts)


def clip_compute(clip: Any) -> float:  # noqa: ANN401
    with quiet_libraries():
        return float(clip.compute())


# --- distribution: FID and KID with the Inception TorchScript ---------------------------------------------------------


class InceptionFeatures(torch.nn.Module):
    """The feature network FID and KID share: NVlabs' TorchScript Inception (``inception-2015-12-05.pt``).

    The network clean-fid and StyleGAN's metrics use (TensorFlow's 2015 Inception, the weights FID was defined
    with), loaded with ``torch.jit.load`` and called as ``net(images, return_features=True)`` on floats in
    [0, 255], NCHW, 299×299, returning ``[N, 2048]`` pool features. torchmetrics' own Inception would need
    torch-fidelity, which breaks ``import torchmetrics`` where torchvision is missing; a ``feature=`` module
    avoids it and makes the network a file the user names.
    """

    def __init__(self, net: Any, num_features: int) -> None:  # noqa: ANN401 - torch.jit.ScriptModule
        super().__init__()
        self.net = net
        self.num_features = num_features  # read by torchmetrics instead of a probe call

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.net(images.to(torch.float32), return_features=True).reshape(images.shape[0], -1)


def load_inception(path: Path, device: torch.device | str = "cpu") -> InceptionFeatures:
    """The TorchScript Inception at ``path`` (``--inception FILE``), probed once on a black image so a wrong
    file fails here, in one line, before any image is drawn."""
    if not path.is_file():
        raise AtedmError(f"--inception {path}: no such file; expected NVlabs' TorchScript Inception "
                         "(inception-2015-12-05.pt, docs/quality.md says where to get it)")
    try:
        net = torch.jit.load(str(path), map_location=torch.device(device)).eval()
        probe = net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=device), return_features=True)
    except Exception as exc:  # noqa: BLE001 - torch.jit raises RuntimeError, ValueError, pickle errors, …
        raise AtedmError(f"--inception {path}: not a TorchScript Inception that takes (images, return_features=True): "
                         f"{_first_sentence(exc)}") from None
    if not isinstance(probe, Tensor) or probe.dim() != 2 or probe.shape[0] != 1:
        shape = list(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise AtedmError(f"--inception {path}: returns {shape} for one image; expected features [1, 2048]")
    if not bool(torch.isfinite(probe).all()):  # NaN features would take FID's matrix square root down (SIGSEGV in MKL)
        raise AtedmError(f"--inception {path}: returns NaN or infinite features for a black image; expected finite "
                         "features (a broken or wrong checkpoint)")
    return InceptionFeatures(net, int(probe.shape[1]))


@dataclass
class Distribution:
    """FID and KID of image sets against one real set, the real set's features extracted once.

    ``reset_real_features=False`` keeps the real features across ``reset``, so each generated set is fed,
    computed and dropped in turn. KID's subset size is ``min(1000, images in the smaller set)``: torchmetrics
    refuses subsets larger than a set, and KID is unbiased at any subset size (why it suits small sets).
    """

    fid: Any
    kid: Any

    @classmethod
    def create(cls, features: InceptionFeatures, subset_size: int, device: torch.device | str = "cpu") -> Distribution:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        with quiet_libraries():  # KID warns that it keeps every feature: 2048 floats an image, known and fine
            fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
            kid = KernelInceptionDistance(feature=features, subset_size=subset_size, reset_real_features=False)
        return cls(fid.to(device), kid.to(device))

    def update(self, images: Tensor, real: bool) -> None:
        """One batch of ``uint8`` 299×299 images, of the real set or of the set being scored."""
        images = images.to(self.fid.device)
        with quiet_libraries():
            self.fid.update(images, real=real)
            self.kid.update(images, real=real)

    def compute(self) -> dict[str, float]:
        """The scored set's FID, KID (mean over subsets) and KID's spread; the scored set is dropped after."""
        with quiet_libraries():
            fid = float(self.fid.compute())
            kid, kid_std = (float(v) for v in self.kid.compute())
            self.fid.reset()
            self.kid.reset()
        return {"fid": fid, "kid": kid, "kid_std": kid_std}


def kid_subset_size(*set_sizes: int) -> int:
    """KID's subset size for sets of these sizes: the default, or the smallest set where that is smaller."""
    return min(KID_SUBSET_SIZE, *set_sizes)


def _first_sentence(exc: BaseException) -> str:
    """torch's own messages run to a paragraph of advice; the first sentence says what failed."""
    return first_line(exc).split(". ")[0].rstrip(".")


def finite_or_none(value: float | None) -> float | None:
    """``value`` where finite; ``None`` for infinities and NaN, which JSON cannot hold."""
    return value if value is not None and math.isfinite(value) else None
