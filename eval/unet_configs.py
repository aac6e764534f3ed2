"""Full-size Stable Diffusion UNet architectures, built with random weights.

Speed and memory depend on a model's shapes, not on its weight values, so the benchmark can build
the real architectures from their configs and run offline on any machine. Each ``unet`` dict below
is the architecture part of the published ``unet/config.json`` (metadata such as
``_diffusers_version`` and keys left at diffusers' defaults are omitted; every key that changes a
shape or an attention setting is spelled out). Each architecture also carries the scheduler its
pipeline ships with, so a random-weight generation walks the same timesteps as the real one (which
matters to AgentSD: its recipe switches phase on the timestep).

``tiny`` and ``tiny-xl`` are two-level toys for the smoke test: ``tiny`` has attention at the top
latent level like SD 1.x/2.x, ``tiny-xl`` only one level down plus the ``text_time`` conditioning,
like SDXL. ``svd`` is Stable Video Diffusion's ``UNetSpatioTemporalConditionModel`` (``unet`` mode
only; its inputs: ``video.py``), ``tiny-svd`` its two-level toy.

:meth:`Arch.build_pipeline` puts the full-size UNet into a real diffusers pipeline with a one-layer
random text encoder, a word-level tokenizer and a four-level toy VAE: only the UNet is timed, but
methods that run the pipeline's own loop (DeepCache, T-GATE) need a pipeline to run in. The text
encoders keep the real widths and 77 tokens, so the UNet's cross-attention costs what it costs with
CLIP; the VAE keeps the 8x latent scale and is never run (the benchmark asks for latents).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Noise schedule shared by SD 1.x, SD 2.x and SDXL.
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# Settings every full-size SD UNet config spells out alike (SD 1.x, 2.x and SDXL).
_FULL_SIZE = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

_SD_BLOCKS = {
    **_FULL_SIZE,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

#: runwayml / stable-diffusion-v1-5, unet/config.json (859.5 M parameters).
SD15_UNET: dict[str, Any] = {**_SD_BLOCKS, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}

#: stabilityai / stable-diffusion-2-1, unet/config.json (865.9 M parameters).
SD21_UNET: dict[str, Any] = {
    **_SD_BLOCKS,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "num_class_embeds": None,
}

#: stabilityai / stable-diffusion-xl-base-1.0, unet/config.json (2567.5 M parameters).
SDXL_UNET: dict[str, Any] = {
    **_FULL_SIZE,
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "upcast_attention": None,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
}

#: stabilityai / stable-video-diffusion-img2vid-xt, unet/config.json (1524.6 M parameters): the defaults of
#: diffusers' UNetSpatioTemporalConditionModel, which are this config (img2vid, the 14-frame model, differs
#: only in num_frames, which changes no shape).
SVD_UNET: dict[str, Any] = {
    "sample_size": 96,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    ],
    "up_block_types": [
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 25,
}

#: Two levels, spatial and temporal attention at the top one (SVD-like), for the smoke test.
TINY_SVD_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "block_out_channels": [32, 64],
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 3 * 8,
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "num_attention_heads": [2, 4],
    "num_frames": 3,
}

_TINY = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}

#: Two levels, attention at the top one (SD 1.x-like), for the smoke test.
TINY_UNET: dict[str, Any] = {
    **_TINY,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}

#: Two levels, attention only one level down, ``text_time`` conditioning (SDXL-like).
TINY_XL_UNET: dict[str, Any] = {
    **_TINY,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": [4, 8],
    "transformer_layers_per_block": [1, 2],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}

#: Tokens of every prompt, as CLIP pads them: the UNet's cross-attention cost depends on it.
TEXT_TOKENS = 77
_WORDS = ("a", "high", "quality", "photograph", "photo", "of", "the", "cat", "dog", "corgi", ".")

#: stabilityai / stable-video-diffusion-img2vid-xt, scheduler/scheduler_config.json, as diffusers' SVD
#: pipeline tests spell it out.
_SVD_EULER = {
    **_BETAS,
    "interpolation_type": "linear",
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}

_PNDM_SD15 = {**_BETAS, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}


@dataclass(frozen=True)
class Arch:
    """A UNet architecture and the scheduler its text-to-image pipeline uses.

    Attributes:
        unet: Keyword config of the UNet.
        scheduler: Scheduler class of the published pipeline.
        scheduler_config: Its ``scheduler/scheduler_config.json`` settings.
        unet_class: The UNet's class: :class:`~diffusers.UNet2DConditionModel`, or SVD's.
    """

    unet: dict[str, Any]
    scheduler: type[SchedulerMixin]
    scheduler_config: dict[str, Any]
    unet_class: type[torch.nn.Module] = UNet2DConditionModel

    def build_unet(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
        """The UNet with seeded random weights (diffusers' default init), on ``device`` in ``dtype``.

        Weights are created directly on ``device``: initialising 2.6 B SDXL parameters is much
        faster on a GPU than on a CPU followed by a copy.
        """
        torch.manual_seed(seed)
        with torch.device(device):
            unet = self.unet_class.from_config(self.unet)
        # Cast only when needed: ModelMixin.to(dtype=...) warns even for a no-op cast.
        return (unet if dtype == unet.dtype else unet.to(dtype=dtype)).eval()

    def build_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler (schedulers keep per-generation state, e.g. PLMS's history)."""
        return self.scheduler.from_config(self.scheduler_config)

    def build_pipeline(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> DiffusionPipeline:
        """The text-to-image pipeline of this architecture: the full-size UNet of :meth:`build_unet`,
        the published scheduler, toy text encoders, tokenizers and VAE (see the module docstring).

        SDXL-like UNets (``text_time`` conditioning) get ``StableDiffusionXLPipeline``: two text
        encoders whose widths add up to the UNet's cross-attention width, the second one projecting
        to the pooled width the UNet's added embedding expects.
        """
        if self.unet_class is not UNet2DConditionModel:
            raise ValueError(f"{self.unet_class.__name__} is timed in --mode unet only: no pipeline is built for it")
        unet = self.build_unet(device, dtype, seed)
        config = unet.config
        torch.manual_seed(seed)
        with torch.device(device):
            vae = _toy_vae()
            if config.addition_embed_type == "text_time":
                pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                parts = dict(
                    text_encoder=CLIPTextModel(_text_config(config.cross_attention_dim - pooled)),
                    text_encoder_2=CLIPTextModelWithProjection(_text_config(pooled, projection=pooled)),
                    tokenizer=_tokenizer(),
                    tokenizer_2=_tokenizer(),
                )
                pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=self.build_scheduler(), **parts)
            else:
                pipe = StableDiffusionPipeline(
                    vae=vae,
                    text_encoder=CLIPTextModel(_text_config(config.cross_attention_dim)),
                    tokenizer=_tokenizer(),
                    unet=unet,
                    scheduler=self.build_scheduler(),
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
        for name, part in pipe.components.items():
            # Cast only what needs it (the UNet already has dtype): ModelMixin.to warns even for a no-op cast.
            if name != "unet" and isinstance(part, torch.nn.Module) and part.dtype != dtype:
                part.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _text_config(width: int, projection: int = 512) -> CLIPTextConfig:
    """One CLIP text layer of the given width (what the UNet sees is a (77, width) embedding)."""
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=width,
        intermediate_size=32,
        num_attention_heads=1,
        num_hidden_layers=1,
        vocab_size=len(_WORDS) + 8,
        max_position_embeddings=TEXT_TOKENS,
        projection_dim=projection,
    )


def _tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a few whole words, padding to 77 tokens (written to a temporary folder)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for word in _WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=TEXT_TOKENS
        )


def _toy_vae() -> AutoencoderKL:
    """Four levels of 8 channels: the 8x latent scale of the real VAE (``pipe.vae_scale_factor``)."""
    levels = 4
    return AutoencoderKL(
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


#: Architectures selectable with ``--arch``.
ARCHS: dict[str, Arch] = {
    # PLMS, as in the SD 1.5 pipeline.
    "sd15": Arch(SD15_UNET, PNDMScheduler, _PNDM_SD15),
    # DDIM with v-prediction, as in the SD 2.1 (768-v) pipeline.
    "sd21": Arch(
        SD21_UNET,
        DDIMScheduler,
        {
            **_BETAS,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "prediction_type": "v_prediction",
        },
    ),
    # Euler with "leading" spacing, as in the SDXL base pipeline.
    "sdxl": Arch(
        SDXL_UNET,
        EulerDiscreteScheduler,
        {
            **_BETAS,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "interpolation_type": "linear",
            "prediction_type": "epsilon",
            "use_karras_sigmas": False,
        },
    ),
    # Euler with Karras sigmas 700 ... 0.002 and c_noise timesteps, as in the SVD (img2vid-xt) pipeline.
    "svd": Arch(SVD_UNET, EulerDiscreteScheduler, _SVD_EULER, UNetSpatioTemporalConditionModel),
    "tiny": Arch(TINY_UNET, PNDMScheduler, _PNDM_SD15),
    "tiny-svd": Arch(TINY_SVD_UNET, EulerDiscreteScheduler, _SVD_EULER, UNetSpatioTemporalConditionModel),
    "tiny-xl": Arch(TINY_XL_UNET, PNDMScheduler, _PNDM_SD15),
}
