"""Video UNets: Stable Video Diffusion's spatial blocks patched frame by frame, its temporal blocks left
alone, its phases on SVD's noise levels; I2VGen-XL likewise; the models refused, with their reasons."""

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, I2VGenXLUNet, UNet2DConditionModel
from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel
from tiny import tiny_unet
from tiny_video import IMAGE_DIM, SVD_SCHEDULER, svd_image, tiny_svd_pipeline, tiny_svd_unet

import agentsd
from agentsd.schedule import SD_LOG_SIGMAS

FRAMES = 3


def _svd_inputs(videos=2, frames=FRAMES, seed=0):
    """A bare SVD UNet's inputs: noisy latents and the image latents, [videos, frames, 8, 16, 16]; the image
    embedding; (fps - 1, motion bucket, noise augmentation)."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(videos, frames, 8, 16, 16, generator=g)
    return sample, torch.randn(videos, 1, IMAGE_DIM, generator=g), torch.tensor([[6.0, 127.0, 0.02]] * videos)


def _forward(unet, sample, image, time_ids, c_noise):
    with torch.no_grad():
        return unet(sample, torch.tensor(c_noise), encoder_hidden_states=image, added_time_ids=time_ids).sample


def _generate(pipe, steps=3, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        svd_image(), generator=generator, height=32, width=32, num_inference_steps=steps, output_type="np", **kwargs
    ).frames


def _temporal_modules(unet):
    return [module for name, module in unet.named_modules() if "temporal_transformer_blocks" in name]


def test_svd_pipeline_patches_the_spatial_blocks_per_frame_and_removes_exactly():
    pipe = tiny_svd_pipeline(FRAMES)
    unpatched = _generate(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no word about the temporal blocks: they are left alone by design
        agentsd.apply_patch(pipe, ratio=0.5)
    summary = agentsd.patch_summary(pipe)
    names = [block.name for block in summary.blocks]
    assert names == [
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0",
    ]
    assert not any("forward" in module.__dict__ for module in _temporal_modules(pipe.unet))
    merged = _generate(pipe)
    assert np.isfinite(merged).all() and np.abs(merged - unpatched).max() > 0
    summary = agentsd.patch_summary(pipe)
    assert {block.tokens_seen for block in summary.blocks} == {256}  # one frame's pixels, never frames
    assert {block.frames_seen for block in summary.blocks} == {FRAMES}
    text = str(summary)
    assert "AgentSD patched 3 of 4 transformer blocks" in text
    assert "video: 3 frames per video in the last call, each frame merged on its own; the 4 temporal" in text
    agentsd.remove_patch(pipe)
    assert np.array_equal(_generate(pipe), unpatched)


def test_bare_svd_unet_reads_its_timestep_as_c_noise_and_removes_exactly():
    unet = tiny_svd_unet(FRAMES).eval()
    inputs = _svd_inputs()
    noisy, clean = 0.25 * math.log(700.0), 0.25 * math.log(0.002)
    before = _forward(unet, *inputs, noisy)
    agentsd.apply_patch(unet, ratio=0.5)
    ran = []
    for c_noise in (noisy, clean):
        _forward(unet, *inputs, c_noise)
        ran.append(agentsd.patch_summary(unet).blocks[0].ran().agents)
    assert ran == [True, False]  # sigma 700: agents; sigma 0.002: ToMe (not c_noise / 1000, ToMe for both)
    agentsd.remove_patch(unet)
    assert torch.equal(_forward(unet, *inputs, noisy), before)


def test_svd_default_steps_fall_in_the_phases_by_sigma():
    """SVD's published scheduler, 25 steps: Karras sigmas 700 ... 0.002. The agent phase covers the
    sigmas of SD's t >= 600 (sigma >= 2.28): steps 0-15 (sigma 3.87 at step 15, 2.27 at step 16)."""
    pipe = tiny_svd_pipeline(FRAMES)
    agentsd.apply_patch(pipe)
    pipe.scheduler.set_timesteps(25)
    summary = agentsd.patch_summary(pipe)
    assert summary.steps == ((0, 15, 0), (16, 24, 1))
    assert "EulerDiscreteScheduler, 25 steps: 0-15 agent attention, 16-24 ToMe" in str(summary)
    threshold = math.exp(SD_LOG_SIGMAS[600])
    sigmas = pipe.scheduler.sigmas[:-1].tolist()
    assert [sigma >= threshold for sigma in sigmas] == [True] * 16 + [False] * 9

    seen = []

    def record(pipe, step, t, kwargs):
        seen.append((math.exp(4 * float(t)), agentsd.patch_summary(pipe).blocks[0].ran().agents))
        return kwargs

    _generate(pipe, steps=4, callback_on_step_end=record)
    assert [agents for _, agents in seen] == [sigma >= threshold for sigma, _ in seen] == [True, True, False, False]


def test_euler_passes_c_noise_only_when_configured_as_svd():
    """Euler with continuous timesteps and v-prediction passes 0.25 log(sigma); otherwise training timesteps."""
    from agentsd.diffusers_patch.timesteps import passes_c_noise

    assert passes_c_noise(EulerDiscreteScheduler(**SVD_SCHEDULER))
    assert not passes_c_noise(EulerDiscreteScheduler(**{**SVD_SCHEDULER, "timestep_type": "discrete"}))
    assert not passes_c_noise(EulerDiscreteScheduler(**{**SVD_SCHEDULER, "prediction_type": "epsilon"}))


def test_frame_f_of_both_guidance_halves_shares_its_destinations():
    """The guided batch [2 videos, F frames] is 2F entries in the spatial blocks: every frame gets the
    same random layout, so equal halves give equal outputs; one video (no guidance) is an odd batch:
    fixed destinations, the seed does not matter."""
    unet = tiny_svd_unet(FRAMES).eval()
    sample, image, time_ids = _svd_inputs(videos=1)
    pair = (torch.cat([sample, sample]), torch.cat([image, image]), torch.cat([time_ids, time_ids]))
    c_noise = 0.25 * math.log(50.0)
    outputs = {}
    for seed in (0, 1):
        agentsd.apply_patch(unet, ratio=0.5, seed=seed)
        guided = _forward(unet, *pair, c_noise)
        assert torch.equal(guided[0], guided[1])
        outputs[seed] = (guided[0], _forward(unet, sample, image, time_ids, c_noise)[0])
    assert not torch.equal(outputs[0][0], outputs[1][0])  # random destinations in the guided pair
    assert torch.equal(outputs[0][1], outputs[1][1])  # fixed ones for the odd batch


def test_svd_num_frames_and_decode_chunk_size_other_than_the_default():
    pipe = tiny_svd_pipeline(FRAMES)
    agentsd.apply_patch(pipe, ratio=0.5)
    frames = _generate(pipe, steps=2, num_frames=2, decode_chunk_size=1)
    assert frames.shape == (1, 2, 32, 32, 3) and np.isfinite(frames).all()
    assert {block.frames_seen for block in agentsd.patch_summary(pipe).blocks} == {2}
    frames = _generate(pipe, steps=2, num_frames=5, decode_chunk_size=2, max_guidance_scale=1.0)
    assert frames.shape == (1, 5, 32, 32, 3) and np.isfinite(frames).all()  # no guidance: one video of 5 frames
    assert "5 frames per video in the last call" in str(agentsd.patch_summary(pipe))


def test_i2vgen_xl_patches_its_spatial_blocks_per_frame_and_removes_exactly():
    torch.manual_seed(0)
    unet = I2VGenXLUNet(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, FRAMES, 16, 16, generator=g)  # [videos, channels, frames, h, w]
    kwargs = dict(
        fps=torch.tensor([8, 8]),
        image_latents=torch.randn(2, 4, FRAMES, 16, 16, generator=g),
        image_embeddings=torch.randn(2, 32, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
    )

    def forward():
        with torch.no_grad():
            return unet(sample, torch.tensor(981), **kwargs).sample

    before = forward()
    agentsd.apply_patch(unet, ratio=0.5)
    assert not any("temp" in block.name or "transformer_in" in block.name for block in agentsd.select_blocks(unet))
    assert not torch.equal(forward(), before)
    summary = agentsd.patch_summary(unet)
    assert {(block.tokens_seen, block.frames_seen) for block in summary.blocks} == {(256, FRAMES)}
    assert all(block.ran().agents for block in summary.blocks)
    assert "the 5 temporal transformer blocks" in str(summary)
    agentsd.remove_patch(unet)
    assert torch.equal(forward(), before)


def _added_kv_unet(**config):
    """A UNet of DeepFloyd IF's or Kandinsky 2.2's kind: SimpleCrossAttn blocks, added-KV attention."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
        encoder_hid_dim=32,
        **config,
    )


@pytest.mark.parametrize(
    "config",
    [
        dict(in_channels=3, out_channels=6, encoder_hid_dim_type="text_proj", addition_embed_type="text"),
        dict(in_channels=4, out_channels=8, encoder_hid_dim_type="image_proj", addition_embed_type="image"),
    ],
    ids=["deepfloyd-if", "kandinsky-2.2"],
)
def test_unets_without_transformer_blocks_are_refused_naming_their_attention(config):
    unet = _added_kv_unet(**config)
    with pytest.raises(ValueError) as refusal:
        agentsd.apply_patch(unet)
    message = str(refusal.value)
    assert message.startswith("UNet2DConditionModel has no BasicTransformerBlock to patch; its attention is added-KV")
    assert "AttnAddedKVProcessor2_0" in message and "SimpleCrossAttnDownBlock2D" in message
    assert "UNetMidBlock2DSimpleCrossAttn" in message and "DeepFloyd IF and Kandinsky 2.2" in message
    assert not agentsd.is_patched(unet)


def test_audioldm2_unet_is_refused_by_name():
    torch.manual_seed(0)
    unet = AudioLDM2UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=(32, 32),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    for call in (agentsd.apply_patch, agentsd.select_blocks):
        refused = "AudioLDM2UNet2DConditionModel is an audio model: its tokens are a spectrogram"
        with pytest.raises(TypeError, match=refused):
            call(unet)
    assert not agentsd.is_patched(unet)
    # AudioLDM's and MusicLDM's pipelines hold a plain UNet2DConditionModel: refused by the pipeline's name.
    pipe = type("MusicLDMPipeline", (), {"unet": tiny_unet("sd1")})()
    with pytest.raises(TypeError, match="MusicLDMPipeline is an audio model"):
        agentsd.apply_patch(pipe)
    assert not agentsd.is_patched(pipe)
