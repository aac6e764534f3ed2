"""The FID half of ``eval/fid.py``: feature extractor, feature statistics, Frechet distance, caching.

Nothing here knows about diffusion. Images go in as uint8 ``[B, 3, H, W]`` tensors, the way
torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` takes them with
``normalize=False``; features are accumulated by that metric, and the distance between two sets is
torchmetrics' own formula applied to (mu, sigma) pairs, so that a pytorch-fid ``.npz`` (mu, sigma)
reference plugs in beside statistics we computed ourselves.

The feature extractor is an ``nn.Module``: the real run builds torch-fidelity's 2048-feature
Inception (the 2015 TF weights, as torchmetrics does for ``feature=2048``); tests pass a small module
of their own. Both go through :func:`make_metric` and everything after it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

# A sibling module: eval/ is on sys.path wherever this one is imported.
from atomic_write import atomic_path  # isort: skip

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity release v0.2.0


#: As the README says (from the repository root): the extra never touches torch, and the second step pins
#: torch to the installed one so that pip picks the torchvision built for it instead of a new torch.
INSTALL_FID = (
    'pip install -e ".[fid]" && pip install torch-fidelity torchvision '
    "\"torch==$(python -c 'import torch; print(torch.__version__)')\""
)
NO_TORCH_FIDELITY = (
    "FID needs the Inception network of torch-fidelity, which is not installed: "
    f"{INSTALL_FID} (see the README for CPU/CUDA builds of torch; the weights then download on first use; "
    f"offline, also pass --inception-weights PATH to a local {INCEPTION_FILE}), or pass --no-fid to only "
    "generate and time images."
)


class FidSetupError(RuntimeError):
    """FID cannot run as asked; the message says which flag or install fixes it."""


# ---------------------------------------------------------------------------------------------
# Feature extractor


def torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def build_inception(weights_path: str | Path | None = None) -> torch.nn.Module:
    """torch-fidelity's Inception v3 (``inception-v3-compat``), 2048 pool features, TF 2015 weights.

    Exactly the network torchmetrics builds for ``FrechetInceptionDistance(feature=2048)``. Without
    ``weights_path`` torch-fidelity downloads the weights into the torch hub cache on first use.
    """
    if not torch_fidelity_available():
        raise FidSetupError(NO_TORCH_FIDELITY)
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(weights_path) if weights_path else None,
        )
    except Exception as exc:  # download refused, corrupt file, ...
        raise FidSetupError(
            f"could not load the Inception weights ({type(exc).__name__}: {exc}). Download {INCEPTION_FILE} "
            "(torch-fidelity release v0.2.0) on a machine with network and pass --inception-weights PATH."
        ) from exc
    net.fid_name = "inception-v3-compat-2048 (torch-fidelity, TF 2015 weights)"
    return net


def weights_digest(model: torch.nn.Module) -> str:
    """A short digest of a model's weights: part of every cache key, so that other weights recompute."""
    digest = hashlib.sha1()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def extractor_id(extractor: torch.nn.Module) -> str:
    """A name for the extractor plus a digest of its weights: part of every cache key."""
    return f"{getattr(extractor, 'fid_name', type(extractor).__name__)}@{weights_digest(extractor)}"


def make_metric(extractor: torch.nn.Module, device: torch.device | str = "cpu") -> FrechetInceptionDistance:
    """The torchmetrics metric that accumulates features; every run goes through here.

    ``sync_on_compute=False``: only the main process ever touches it, also under accelerate.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # imported on use: a bad flag fails in a second

    metric = FrechetInceptionDistance(
        feature=extractor, reset_real_features=True, normalize=False, sync_on_compute=False
    )
    return metric.to(device)


# ---------------------------------------------------------------------------------------------
# Statistics and distance


@dataclass
class Stats:
    """Gaussian statistics of a feature set (float64), as pytorch-fid stores them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def save(self, path: Path, key: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("wb") as handle:  # a file object: savez adds no suffix
            np.savez(handle, mu=self.mu, sigma=self.sigma, n=self.n, key=key)

    @classmethod
    def load(cls, path: Path, key: str | None = None) -> Stats | None:
        """Stats from a ``.npz`` with ``mu`` and ``sigma``; None when ``key`` is given and differs."""
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise FidSetupError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(data.keys())})")
            if key is not None and ("key" not in data or str(data["key"]) != key):
                return None
            n = int(data["n"]) if "n" in data else -1
            return cls(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64), n)


def metric_stats(metric: FrechetInceptionDistance, real: bool) -> Stats:
    """Mean and covariance of one side of the metric, computed exactly as ``metric.compute()`` does."""
    side = "real" if real else "fake"
    n = getattr(metric, f"{side}_features_num_samples")
    if int(n) < 2:
        raise FidSetupError(f"FID needs at least 2 images in a set, got {int(n)}")
    total = getattr(metric, f"{side}_features_sum")
    cov_sum = getattr(metric, f"{side}_features_cov_sum")
    mean = (total / n).unsqueeze(0)
    cov = (cov_sum - n * mean.t().mm(mean)) / (n - 1)
    return Stats(mean.squeeze(0).cpu().numpy(), cov.cpu().numpy(), int(n))


def frechet_distance(a: Stats, b: Stats) -> float:
    """torchmetrics' FID formula (||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b))) in float64."""
    if a.mu.shape != b.mu.shape:
        raise FidSetupError(f"feature sizes differ: {a.mu.shape[0]} vs {b.mu.shape[0]} (another extractor?)")
    from torchmetrics.image.fid import _compute_fid

    t = lambda x: torch.from_numpy(np.asarray(x, np.float64))  # noqa: E731
    return float(_compute_fid(t(a.mu), t(a.sigma), t(b.mu), t(b.sigma)))


# ---------------------------------------------------------------------------------------------
# Images -> statistics, with a cache


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; hidden and temporary files never count."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def load_image(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 ``[3, H, W]``; with ``size`` (width, height), centre-cropped to its aspect and resized (bicubic)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != tuple(size):
            w, h = im.size
            scale = max(size[0] / w, size[1] / h)
            cw, ch = round(size[0] / scale), round(size[1] / scale)
            left, top = (w - cw) // 2, (h - ch) // 2
            im = im.crop((left, top, left + cw, top + ch)).resize(tuple(size), Image.BICUBIC)
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = list(paths), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.size)


def files_key(paths: list[Path], *extra: object) -> str:
    """A digest of the file list (names, sizes, mtimes) and whatever else decides the statistics."""
    digest = hashlib.sha1(json.dumps([str(x) for x in extra]).encode())
    for p in paths:
        st = p.stat()
        digest.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def image_stats(
    metric: FrechetInceptionDistance,
    paths: list[Path],
    *,
    size: tuple[int, int] | None = None,
    batch_size: int = 50,
    workers: int = 0,
    cache: Path | None = None,
    desc: str = "features",
    progress: bool = True,
) -> Stats:
    """Inception statistics of ``paths``, read from ``cache`` when its key matches, else computed and cached."""
    key = files_key(paths, extractor_id(metric.inception), size) if cache is not None else None
    if cache is not None and cache.exists():
        cached = Stats.load(cache, key)
        if cached is not None:
            return cached
    from tqdm.auto import tqdm

    metric.reset()
    device = metric.real_features_sum.device
    loader = torch.utils.data.DataLoader(_Images(paths, size), batch_size=batch_size, num_workers=workers)
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            metric.update(batch.to(device), real=True)
    stats = metric_stats(metric, real=True)
    metric.reset()
    if cache is not None:
        stats.save(cache, key)
    return stats
