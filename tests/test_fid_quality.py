"""The quality metrics of eval/quality_metrics.py against independent computations, offline.

CLIP score on a tiny CLIP model built from a config (the same loading path as a real one), PSNR and
SSIM by hand on known images, LPIPS on a tiny network with torchmetrics' LPIPS head. Also home of
:func:`save_tiny_clip` and :func:`tiny_lpips`, which the command tests of eval/fid.py use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from scipy.ndimage import correlate1d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import fid_metrics as fm  # noqa: E402
import quality_metrics as qm  # noqa: E402


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP model (text and vision towers, 32 px images) with its processor, saved as a hub folder would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = dict(tiny._text_config(projection=False).to_dict())
    vision = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    size = {"shortest_edge": 32}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}),
        tokenizer=tiny.tiny_tokenizer(folder),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class _TinyBackbone(torch.nn.Module):
    """Two conv layers, each output a 'layer' of LPIPS features."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x):
        h1 = torch.relu(self.conv1(x))
        return h1, torch.relu(self.conv2(h1))


def tiny_lpips(seed: int = 0) -> torch.nn.Module:
    """torchmetrics' LPIPS network (its forward: scaling, unit-normalized features, 1x1 heads) on a tiny backbone."""
    from torchmetrics.functional.image.lpips import _LPIPS, NetLinLayer, ScalingLayer

    class TinyLpips(_LPIPS):
        def __init__(self):  # noqa: D107 (no torchvision: the backbone is ours, the rest is torchmetrics')
            torch.nn.Module.__init__(self)
            torch.manual_seed(seed)
            self.scaling_layer, self.net, self.resize, self.spatial, self.L = (
                ScalingLayer(),
                _TinyBackbone(),
                None,
                False,
                2,
            )
            self.lins = torch.nn.ModuleList([NetLinLayer(4, use_dropout=False), NetLinLayer(8, use_dropout=False)])
            for lin in self.lins:
                lin.model[0].weight.data.abs_()  # LPIPS heads are non-negative
            self.lpips_name = "tiny-lpips"
            self.eval()

    return TinyLpips()


def write_images(folder: Path, arrays) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


@pytest.fixture
def pairs(tmp_path):
    """Three 32 px images and a noisy copy of each (one pair identical but for a single pixel)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:32, 0:32]
    base = [(np.stack([xs * 8, ys * 8, (xs + ys) * 4], -1) % 256).astype(np.uint8)]
    base += [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    noisy = [np.clip(b.astype(int) + rng.integers(-20, 21, b.shape), 0, 255).astype(np.uint8) for b in base[1:]]
    one_pixel = base[0].copy()
    one_pixel[3, 4, 1] ^= 1
    return (
        write_images(tmp_path / "a", [one_pixel, *noisy]),
        write_images(tmp_path / "b", base),
        base,
        [one_pixel, *noisy],
    )


def ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two float images [H, W, C] in [0, 1]: 11-tap Gaussian (sigma 1.5), mirrored borders, mean map."""
    t = np.arange(11) - 5
    g = np.exp(-(t**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(a):
        return correlate1d(correlate1d(a, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")

    c1, c2 = 0.01**2, 0.03**2
    out = []
    for c in range(x.shape[2]):
        a, b = x[..., c], y[..., c]
        ma, mb = blur(a), blur(b)
        va, vb, cov = blur(a * a) - ma**2, blur(b * b) - mb**2, blur(a * b) - ma * mb
        out.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(out))


def test_psnr_and_ssim_against_a_computation_by_hand(pairs):
    paths, refs, base, made = pairs
    got = qm.fidelity(paths, refs, batch_size=2)
    xs, ys = [m.astype(np.float64) / 255 for m in made], [b.astype(np.float64) / 255 for b in base]
    psnr = np.mean([10 * np.log10(1 / np.mean((x - y) ** 2)) for x, y in zip(xs, ys)])
    assert got["psnr"] == pytest.approx(psnr, rel=1e-5)
    pooled = 10 * np.log10(1 / np.mean([np.mean((x - y) ** 2) for x, y in zip(xs, ys)]))
    assert got["psnr"] > pooled + 10  # averaged per image (the one-pixel pair counts), not over pooled pixels
    assert got["ssim"] == pytest.approx(np.mean([ssim_by_hand(x, y) for x, y in zip(xs, ys)]), rel=1e-4)
    assert got["lpips"] is None
    same = qm.fidelity(refs, refs)
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)


def test_lpips_against_a_computation_by_hand(pairs):
    paths, refs, base, made = pairs
    net = tiny_lpips()
    got = qm.fidelity(paths, refs, net, batch_size=2)["lpips"]
    shift = np.array([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = np.array([0.458, 0.448, 0.450])[None, :, None, None]

    def features(images):
        x = np.stack(images).transpose(0, 3, 1, 2).astype(np.float64) / 255
        x = ((2 * x - 1) - shift) / scale
        with torch.no_grad():
            return [f.double().numpy() for f in net.net(torch.from_numpy(x).float())]

    total = 0.0
    for f0, f1, lin in zip(features(made), features(base), net.lins):
        n0 = f0 / np.sqrt(1e-8 + (f0**2).sum(1, keepdims=True))
        n1 = f1 / np.sqrt(1e-8 + (f1**2).sum(1, keepdims=True))
        w = lin.model[0].weight.detach().double().numpy()[0, :, 0, 0]
        total = total + np.einsum("c,nchw->n", w, (n0 - n1) ** 2) / (f0.shape[2] * f0.shape[3])
    assert got == pytest.approx(float(np.mean(total)), rel=1e-4)
    assert got > 0 and qm.fidelity(refs, refs, net)["lpips"] == pytest.approx(0.0, abs=1e-7)


def test_clip_score_against_the_model_by_hand(tmp_path, pairs):
    from transformers import CLIPModel, CLIPProcessor

    paths, _, _, made = pairs
    folder = save_tiny_clip(tmp_path / "clip")
    prompts = ["a cat", "dog .", "a"]  # short: the tiny tokenizer spells unknown words out, 16 tokens at most
    metric = qm.load_clip(str(folder))
    got = qm.clip_score(metric, paths, prompts, batch_size=2)
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(m) for m in made], return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_in = processor(text=prompts, return_tensors="pt", padding=True)
        text = model.text_projection(model.text_model(**text_in).pooler_output)
    cos = torch.nn.functional.cosine_similarity(image, text).double().numpy()
    assert got == pytest.approx(max(100 * cos.mean(), 0.0), rel=1e-4, abs=1e-4)
    assert got > 0  # the tiny model's mean cosine is positive: the test compares more than the clamp
    assert metric.model_id.startswith(str(folder) + "@")


def test_a_clip_model_that_cannot_load_names_the_flags(tmp_path):
    with pytest.raises(fm.FidSetupError, match="--clip-model") as err:
        qm.load_clip(str(tmp_path / "no-such-model"))
    assert "--no-clip" in str(err.value)


def test_cached_values_follow_their_key(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"x": len(calls)}  # noqa: E731
    assert qm.cached(tmp_path / "c.json", "k1", compute) == {"x": 1}
    assert qm.cached(tmp_path / "c.json", "k1", compute) == {"x": 1} and len(calls) == 1
    assert qm.cached(tmp_path / "c.json", "k2", compute) == {"x": 2}
