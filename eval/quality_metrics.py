"""The metrics of ``eval/fid.py`` besides FID: CLIP score, and PSNR, SSIM and LPIPS against SD's images.

* CLIP score: torchmetrics' :class:`~torchmetrics.multimodal.clip_score.CLIPScore` (the mean over
  images of ``100 * cos(image embedding, prompt embedding)``, clamped at 0), with a transformers CLIP
  model loaded from the hub or a local folder. torchmetrics 1.9 reads ``get_image_features`` as a
  tensor, which transformers 5 no longer returns (torchmetrics issue #3407): :class:`_TensorFeatures`
  hands it the projected embedding under either version.
* Fidelity to the SD image of the same seed, the way acceleration papers report it: PSNR (per image,
  then averaged), SSIM (11-px Gaussian window, sigma 1.5, borders
  reflected) and LPIPS (AlexNet), all from torchmetrics
  on images in [0, 1]. LPIPS needs torchvision for its backbone; without it LPIPS is skipped and the
  reason said (``LPIPS_UNAVAILABLE``).

Nothing here knows about diffusion: images come in as files, prompts as strings. The models are
``nn.Module``s that tests replace with tiny ones (a CLIP model built from a config, an LPIPS network
with a two-layer backbone).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atomic_write import atomic_path  # isort: skip
from fid_metrics import FidSetupError, files_key, load_image, weights_digest  # isort: skip

if TYPE_CHECKING:  # torchmetrics is imported on use, so that a bad flag fails in a second
    from torchmetrics.multimodal.clip_score import CLIPScore

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' default, the usual choice in papers
LPIPS_UNAVAILABLE = (
    "LPIPS skipped: torchmetrics builds its AlexNet backbone with torchvision, which is not installed "
    "(install the torchvision build that matches your torch; its AlexNet weights then download on first use "
    "into $TORCH_HOME/hub/checkpoints, where an offline machine can be given alexnet-owt-7be5be79.pth)"
)


# ---------------------------------------------------------------------------------------------
# Models


class _TensorFeatures(torch.nn.Module):
    """A CLIP model whose ``get_*_features`` return the projected embedding as a tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: an output object


def load_clip(name_or_path: str) -> CLIPScore:
    """torchmetrics' CLIPScore around the CLIP model at ``name_or_path`` (hub id or folder), on the CPU.

    Loading happens here, before any image is generated, so that an offline run without the weights
    stops at once; the message names ``--clip-model`` and ``--no-clip``.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    try:
        model, processor = CLIPModel.from_pretrained(name_or_path), CLIPProcessor.from_pretrained(name_or_path)
    except Exception as exc:  # offline, no such folder, not a CLIP model, ...
        raise FidSetupError(
            f"--clip-model: cannot load the CLIP model {name_or_path!r} ({type(exc).__name__}: {exc}). "
            "Offline, download it on a machine with network (e.g. `hf download openai/clip-vit-large-patch14`) "
            "and pass --clip-model PATH, or pass --no-clip to skip the CLIP score."
        ) from exc
    # sync_on_compute=False: only the main process computes metrics, also under accelerate.
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model.eval()), processor), sync_on_compute=False)
    metric.model_id = f"{name_or_path}@{weights_digest(model)}"
    return metric


def lpips_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def build_lpips() -> torch.nn.Module:
    """torchmetrics' LPIPS network (AlexNet backbone from torchvision, the linear heads torchmetrics ships)."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    try:
        net = _NoTrainLpips(net="alex")
    except Exception as exc:  # the AlexNet weights could not be downloaded
        raise FidSetupError(
            f"--no-lpips: cannot build the LPIPS network ({type(exc).__name__}: {exc}). Put torchvision's "
            "alexnet-owt-7be5be79.pth into $TORCH_HOME/hub/checkpoints, or pass --no-lpips."
        ) from exc
    net.lpips_name = "lpips-alex (torchmetrics)"
    return net


# ---------------------------------------------------------------------------------------------
# Metrics over image files


class _Pairs(torch.utils.data.Dataset):
    """uint8 ``[3, H, W]`` images, optionally paired with the image of the same index in a second list."""

    def __init__(self, paths: list[Path], others: list[Path] | None = None):
        self.paths, self.others = paths, others

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = load_image(self.paths[i])
        return image if self.others is None else (image, load_image(self.others[i]))


def _loader(dataset, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def clip_score(
    metric: CLIPScore, paths: list[Path], prompts: list[str], *, batch_size: int = 50, workers: int = 0, device="cpu"
) -> float:
    """Mean CLIP score of each image with its prompt (torchmetrics' formula)."""
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts")
    metric.reset()
    metric.to(device)
    with torch.inference_mode():
        for k, batch in enumerate(_loader(_Pairs(paths), batch_size, workers)):
            metric.update(list(batch.to(device)), prompts[k * batch_size : k * batch_size + len(batch)])
    score = float(metric.compute())
    metric.reset()
    return score


def fidelity(
    paths: list[Path],
    references: list[Path],
    lpips: torch.nn.Module | None = None,
    *,
    batch_size: int = 50,
    workers: int = 0,
    device="cpu",
) -> dict[str, float | None]:
    """PSNR (dB), SSIM and LPIPS of each image against the reference image of the same index, averaged.

    A pair of identical images has an infinite PSNR (and so has the mean, then): it is reported as such.
    """
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    once = dict(sync_on_compute=False)  # only the main process computes metrics, also under accelerate
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3), **once).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, **once).to(device)
    lpips = lpips.to(device) if lpips is not None else None
    lpips_sum, n = 0.0, 0
    with torch.inference_mode():
        for image, reference in _loader(_Pairs(paths, references), batch_size, workers):
            x, y = image.to(device).float() / 255, reference.to(device).float() / 255
            psnr.update(x, y)
            ssim.update(x, y)
            if lpips is not None:
                lpips_sum += float(lpips(x, y, normalize=True).sum())
            n += len(x)
    return {
        "psnr": float(psnr.compute()),
        "ssim": float(ssim.compute()),
        "lpips": lpips_sum / n if lpips is not None else None,
    }


def cached(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, stored in ``path`` with ``key``; read back instead while the key matches."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "value": value}))
    return value


def pairs_key(paths: list[Path], references: list[Path], *models: str | None) -> str:
    """The cache key of a metric over ``paths`` (and their references): the files and the models."""
    return files_key(paths + references, *models)
