"""Every supported diffusers pipeline generates with AgentSD and comes back exactly after removal."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline

import agentsd


def _call_kwargs(kind):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    extra = {
        "sd": {},
        "img2img": {"image": image, "strength": 0.9},
        "inpaint": {"image": image, "mask_image": Image.new("L", (32, 32), 255)},
        "controlnet": {"image": image},
        "sdxl": {"height": 32, "width": 32},
    }[kind]
    return dict(prompt="a photo of a cat", num_inference_steps=3, output_type="np", **extra)


def _generate(pipe, kind, seed=0):
    return pipe(generator=torch.Generator().manual_seed(seed), **_call_kwargs(kind)).images


@pytest.mark.parametrize("kind", ["sd", "img2img", "inpaint", "controlnet", "sdxl"])
def test_pipeline_generates_with_agentsd_and_restores(tmp_path, kind):
    pipe = tiny_pipeline(kind, tmp_path)
    baseline = _generate(pipe, kind)

    assert agentsd.apply_patch(pipe, ratio=0.5) is pipe
    summary = agentsd.patch_summary(pipe)
    assert summary.blocks and all(block.tokens_seen is None for block in summary.blocks)
    patched = _generate(pipe, kind)
    again = _generate(pipe, kind)
    assert {block.tokens_seen for block in agentsd.patch_summary(pipe).blocks} == {16 * 16 // summary.max_downsample**2}

    agentsd.remove_patch(pipe)
    restored = _generate(pipe, kind)

    assert patched.shape == baseline.shape and np.isfinite(patched).all()
    assert not np.array_equal(patched, baseline)  # AgentSD really ran
    assert np.array_equal(patched, again)  # same seed, same image
    assert np.array_equal(restored, baseline)  # removal gives back the very same pipeline


def test_global_rng_untouched_by_a_generation(tmp_path):
    pipe = tiny_pipeline("sd", tmp_path)
    agentsd.apply_patch(pipe, ratio=0.5)
    state = torch.get_rng_state()
    _generate(pipe, "sd")
    assert torch.equal(torch.get_rng_state(), state)


def test_no_guidance_and_several_images_per_prompt(tmp_path):
    pipe = tiny_pipeline("sd", tmp_path)
    agentsd.apply_patch(pipe, ratio=0.5)
    kwargs = _call_kwargs("sd")
    for guidance, count in ((1.0, 1), (1.0, 3), (7.5, 2)):
        images = pipe(guidance_scale=guidance, num_images_per_prompt=count, **kwargs).images
        assert images.shape == (count, 32, 32, 3) and np.isfinite(images).all()


def test_img2img_low_strength_never_reaches_the_agent_phase(tmp_path, monkeypatch):
    """The recipe follows the noise level: an img2img run starting at t < 600 is plain ToMe throughout."""
    pipe = tiny_pipeline("img2img", tmp_path)
    agentsd.apply_patch(pipe, ratio=0.5)
    calls = []
    original = agentsd.attention.agent_attention
    monkeypatch.setattr(agentsd.attention, "agent_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    kwargs = _call_kwargs("img2img") | {"num_inference_steps": 10}
    pipe(**kwargs | {"strength": 0.5})
    assert not calls
    pipe(**kwargs | {"strength": 1.0})
    assert calls
