"""The FID math of eval/fid_metrics.py, on its own: torchmetrics, scipy and our (mu, sigma) path agree.

Also home of :class:`TinyExtractor`, the small feature extractor that the command tests inject in
place of the Inception network (it cannot be downloaded in tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import fid_metrics as fm  # noqa: E402


class TinyExtractor(torch.nn.Module):
    """uint8 images [B, 3, H, W] -> 8 features (4x4 average pool, then a fixed random projection)."""

    num_features = 8

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(48, self.num_features)
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3, (x.dtype, x.shape)
        self.images_seen += x.shape[0]
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1))


class Identity(torch.nn.Module):
    """Treats the 'images' it gets as features already: lets the tests feed Gaussian features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance as pytorch-fid computes it (scipy's sqrtm)."""
    covmean = np.real(linalg.sqrtm(sigma1 @ sigma2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian(n, dim, shift, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ (torch.eye(dim, dtype=torch.float64) + mix) + shift


def test_identical_sets_give_zero():
    x = gaussian(300, 16, 0.0, seed=1)
    metric = fm.make_metric(Identity(16))
    metric.update(x, real=True)
    metric.update(x, real=False)
    assert abs(float(metric.compute())) < 1e-6
    stats = fm.metric_stats(metric, real=True)
    assert abs(fm.frechet_distance(stats, stats)) < 1e-6


def test_gaussian_features_torchmetrics_scipy_and_stats_path_agree():
    a, b = gaussian(400, 16, 0.0, seed=2), gaussian(500, 16, 0.3, seed=3)
    metric = fm.make_metric(Identity(16))
    metric.update(a, real=True)
    metric.update(b, real=False)
    tm = float(metric.compute())
    sa, sb = fm.metric_stats(metric, real=True), fm.metric_stats(metric, real=False)
    # Our statistics are numpy's unbiased mean/covariance, as pytorch-fid computes them.
    np.testing.assert_allclose(sa.mu, a.numpy().mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sa.sigma, np.cov(a.numpy(), rowvar=False), rtol=1e-8, atol=1e-10)
    direct = scipy_fid(sa.mu, sa.sigma, sb.mu, sb.sigma)
    ours = fm.frechet_distance(sa, sb)
    assert tm > 1.0  # the sets really differ
    assert ours == pytest.approx(tm, rel=1e-9)
    assert direct == pytest.approx(tm, rel=1e-6)
    assert fm.frechet_distance(sb, sa) == pytest.approx(tm, rel=1e-6)


def test_npz_reference_as_pytorch_fid_writes_it(tmp_path):
    a, b = gaussian(300, 8, 0.0, seed=4), gaussian(300, 8, 0.5, seed=5)
    mu, sigma = a.numpy().mean(0), np.cov(a.numpy(), rowvar=False)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)  # no n, no key: pytorch-fid's layout
    ref = fm.Stats.load(tmp_path / "ref.npz")
    metric = fm.make_metric(Identity(8))
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert fm.frechet_distance(fm.metric_stats(metric, real=False), ref) == pytest.approx(
        float(metric.compute()), rel=1e-8
    )
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(fm.FidSetupError, match="mu"):
        fm.Stats.load(tmp_path / "bad.npz")


def test_image_stats_are_cached_and_the_key_follows_files_and_extractor(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(paths[-1])
    ext = TinyExtractor()
    metric = fm.make_metric(ext)
    cache = tmp_path / "cache" / "set.npz"
    first = fm.image_stats(metric, paths, cache=cache, batch_size=2, progress=False)
    assert ext.images_seen == 5 and cache.exists()
    again = fm.image_stats(metric, paths, cache=cache, batch_size=2, progress=False)
    assert ext.images_seen == 5  # from the cache
    np.testing.assert_array_equal(first.sigma, again.sigma)
    fm.image_stats(metric, paths[:4], cache=cache, batch_size=2, progress=False)
    assert ext.images_seen == 9  # other files: computed again
    other = fm.make_metric(TinyExtractor(seed=1))
    assert fm.extractor_id(other.inception) != fm.extractor_id(metric.inception)
    fm.image_stats(other, paths[:4], cache=cache, batch_size=2, progress=False)
    assert other.inception.images_seen == 4  # another extractor: computed again


def test_reference_images_are_centre_cropped_and_resized(tmp_path):
    Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    x = fm.load_image(tmp_path / "wide.png", size=(16, 16))
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8


def test_without_torch_fidelity_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setattr(fm, "torch_fidelity_available", lambda: False)
    with pytest.raises(fm.FidSetupError, match=r'pip install -e "\.\[fid\]"') as err:
        fm.build_inception(None)
    assert "--inception-weights" in str(err.value)
