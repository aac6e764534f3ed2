"""Tiny Stable Video Diffusion models built from configs, for offline tests.

Shaped after the fast tests of diffusers' own ``StableVideoDiffusionPipeline`` (two levels, attention
at the top one), smaller where it does not matter to AgentSD. The scheduler is SVD's as published:
``EulerDiscreteScheduler`` with Karras sigmas from 700 down to 0.002, continuous timesteps
(``0.25 * log(sigma)``) and v-prediction (:data:`SVD_SCHEDULER`).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

IMAGE_DIM = 32

#: The scheduler of stabilityai/stable-video-diffusion-img2vid(-xt), scheduler/scheduler_config.json, as
#: diffusers' own SVD pipeline tests spell it out (tests/pipelines/stable_video_diffusion/).
SVD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    trained_betas=None,
    use_karras_sigmas=True,
)


def tiny_svd_unet(num_frames: int = 3, seed: int = 0) -> UNetSpatioTemporalConditionModel:
    """A two-level UNetSpatioTemporalConditionModel: spatial and temporal blocks at the top level and the mid block."""
    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=IMAGE_DIM,
        num_attention_heads=(2, 4),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=3 * 8,
        num_frames=num_frames,
    )


def tiny_svd_pipeline(num_frames: int = 3) -> StableVideoDiffusionPipeline:
    """A tiny image-to-video pipeline (32 px frames, latent 16) with SVD's published scheduler."""
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
    )
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=IMAGE_DIM,
            projection_dim=IMAGE_DIM,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            intermediate_size=37,
            patch_size=8,
        )
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=tiny_svd_unet(num_frames),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def svd_image(seed: int = 0) -> torch.Tensor:
    """The conditioning image, a [1, 3, 32, 32] tensor in [0, 1] (a tensor skips the resize to 224 px)."""
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
