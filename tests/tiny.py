"""Tiny Stable Diffusion models built from configs, for offline tests.

Every model here has random weights (seeded) and is small enough that a whole pipeline call takes
well under a second on a CPU. The shapes mirror the real families where it matters to AgentSD:

* ``sd1``: attention at the top latent level (like SD 1.x/2.x), so the default ``max_downsample=1``
  patches it.
* ``sdxl``: no attention at the top level, attention one level down (like SDXL), plus the two text
  encoders and the ``text_time`` added conditioning.

Nothing here touches the network: the tokenizer is written from a small local vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_DIM = 32
WORDS = ["a", "high", "quality", "photograph", "photo", "of", "the", "cat", "dog", "corgi", "tench", "goldfish", "."]


def tiny_unet(kind: str = "sd1", in_channels: int = 4, seed: int = 0) -> UNet2DConditionModel:
    """A two-level UNet2DConditionModel; ``kind`` is ``"sd1"`` or ``"sdxl"``."""
    torch.manual_seed(seed)
    if kind == "sd1":
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    if kind == "sdxl":
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_DIM,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
            transformer_layers_per_block=(1, 2),
            norm_num_groups=8,
        )
    raise ValueError(f"kind must be 'sd1' or 'sdxl', got {kind!r}")


def tiny_vae(seed: int = 0, channels: int = 4, **config) -> AutoencoderKL:
    """A VAE with a downsampling factor of 2 (image 32 px <-> latent 16), ``channels`` latent channels;
    ``config`` adds to its configuration (SD3's and Flux's ``shift_factor`` and ``scaling_factor``)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        **config,
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=channels,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a handful of whole words, written to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for word in WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _text_config(projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(WORDS) + 8,
        max_position_embeddings=16,
        projection_dim=TEXT_DIM if projection else 512,
    )


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config(projection=False))


def tiny_scheduler() -> PNDMScheduler:
    """SD 1.5's scheduler settings (PNDM / PLMS, scaled-linear betas, steps_offset 1)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_pipeline(kind: str, folder: str | Path):
    """A tiny pipeline of the given kind; ``folder`` receives the tokenizer files.

    ``kind`` is one of ``"sd"``, ``"img2img"``, ``"inpaint"``, ``"controlnet"``, ``"sdxl"``.
    """
    folder = Path(folder)
    common = dict(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(folder / "tokenizer"),
        scheduler=tiny_scheduler(),
    )
    sd_extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sd":
        pipe = StableDiffusionPipeline(unet=tiny_unet("sd1"), **common, **sd_extra)
    elif kind == "img2img":
        pipe = StableDiffusionImg2ImgPipeline(unet=tiny_unet("sd1"), **common, **sd_extra)
    elif kind == "inpaint":
        pipe = StableDiffusionInpaintPipeline(unet=tiny_unet("sd1", in_channels=9), **common, **sd_extra)
    elif kind == "controlnet":
        unet = tiny_unet("sd1")
        torch.manual_seed(1)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        pipe = StableDiffusionControlNetPipeline(unet=unet, controlnet=controlnet, **common, **sd_extra)
    elif kind == "sdxl":
        torch.manual_seed(2)
        pipe = StableDiffusionXLPipeline(
            unet=tiny_unet("sdxl"),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=True)),
            tokenizer_2=tiny_tokenizer(folder / "tokenizer_2"),
            **common,
        )
    else:
        raise ValueError(f"kind must be one of sd, img2img, inpaint, controlnet, sdxl; got {kind!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: str | Path, kind: str = "sd") -> Path:
    """Save a tiny pipeline with ``save_pretrained`` so that ``from_pretrained(folder)`` loads it."""
    folder = Path(folder)
    pipe = tiny_pipeline(kind, folder / "_scratch")
    pipe.save_pretrained(folder)
    return folder
