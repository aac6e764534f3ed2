"""Full-size diffusion transformer architectures (SD3.5 Medium, PixArt-Sigma, Flux), built with random
weights, and the inputs their pipelines give one forward.

As for the UNets (``unet_configs.py``), speed depends on shapes, not on weight values: each ``config``
below is the architecture part of the published ``transformer/config.json`` (metadata omitted), so the
benchmark runs offline on any machine. Where each comes from:

* ``sd35-medium``: ``stabilityai/stable-diffusion-3.5-medium``, ``transformer/config.json``
  (``SD3Transformer2DModel``, 24 MMDiT-X blocks of 24 heads x 64, the first 13 with a second,
  image-only self-attention; 2.24 B parameters). Its pipeline's prompt is 77 CLIP + 256 T5 tokens
  (``StableDiffusion3Pipeline(max_sequence_length=256)``), its pooled text 2 x CLIP = 2048 wide.
* ``pixart-sigma``: ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``, ``transformer/config.json``
  (``PixArtTransformer2DModel``, 28 blocks of 16 heads x 72; 0.61 B parameters); its pipeline's prompt
  is 300 T5 tokens (``PixArtSigmaPipeline(max_sequence_length=300)``) with their attention mask.
* ``flux``: ``black-forest-labs/FLUX.1-dev``, ``transformer/config.json`` (``FluxTransformer2DModel``,
  24 heads x 128 = 3072 wide) at full width but with :data:`FLUX_BLOCKS` blocks instead of 19 double-
  and 38 single-stream ones (11.9 B parameters, 48 GB in float32, do not fit a 24 GB GPU or this
  machine): every block of a kind is the same, so one of each, timed alone (``benchmarks/block.py``)
  or in a forward of the reduced model, says what the whole model's blocks do. Its prompt is 512 T5
  tokens (``FluxPipeline(max_sequence_length=512)``), its pooled text CLIP's 768.

What one forward gets (:meth:`TransformerArch.inputs`), as each pipeline builds it: SD3.5 and PixArt
run classifier-free guidance, a batch of 2 per image (the unconditional and the prompted halves, as
the UNets); FLUX.1-dev is guidance-distilled, one row per image, the guidance scale an input
(``guidance``), so a "guided pair" of eval/speed.py's ``--batch`` is one Flux row. Latents are the
VAE's 8x smaller 16 channels (SD3, Flux) or 4 (PixArt); Flux packs 2 x 2 latent pixels into one token
([B, (H / 16) * (W / 16), 64]) with position ids (0, row, column) per image token and zeros per text
token, and takes its timestep as ``t / 1000`` (the model multiplies by 1000 inside).

The ``tiny-*`` architectures are test-sized versions of the same classes with every feature the full
ones use (SD3's dual attention and its last, context-pre-only block; Flux's guidance embedding and
both block kinds; PixArt's ``ada_norm_single``), built in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

#: Double- and single-stream blocks of the reduced full-width Flux (``--flux-blocks``).
FLUX_BLOCKS = (1, 1)
#: Guidance scale of a FLUX.1-dev generation (``FluxPipeline(guidance_scale=3.5)``), an input of the model.
FLUX_GUIDANCE = 3.5

#: stabilityai / stable-diffusion-3.5-medium, transformer/config.json.
SD35_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}

#: PixArt-alpha / PixArt-Sigma-XL-2-1024-MS, transformer/config.json.
PIXART_SIGMA: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
    "attention_type": "default",
}

#: black-forest-labs / FLUX.1-dev, transformer/config.json, with :data:`FLUX_BLOCKS` blocks.
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": FLUX_BLOCKS[0],
    "num_single_layers": FLUX_BLOCKS[1],
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

#: One forward's inputs: ``inputs(model, images, resolution, timestep, generator)`` -> keyword arguments.
Inputs = Callable[[torch.nn.Module, int, int, int, torch.Generator], dict[str, Any]]


def _randn(model: torch.nn.Module, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(model.device, model.dtype)


def _sd3_inputs(model: torch.nn.Module, images: int, resolution: int, timestep: int, generator: torch.Generator):
    """A guided pair per image: latents, 77 + 256 text tokens, pooled CLIP text, a 1000-scale timestep."""
    config, batch, latent = model.config, 2 * images, resolution // 8
    return {
        "hidden_states": _randn(model, generator, batch, config.in_channels, latent, latent),
        "encoder_hidden_states": _randn(model, generator, batch, 77 + 256, config.joint_attention_dim),
        "pooled_projections": _randn(model, generator, batch, config.pooled_projection_dim),
        "timestep": torch.full((batch,), float(timestep), device=model.device),
    }


def _pixart_inputs(model: torch.nn.Module, images: int, resolution: int, timestep: int, generator: torch.Generator):
    """A guided pair per image: latents, 300 T5 tokens with their mask, the training timestep."""
    config, batch, latent = model.config, 2 * images, resolution // 8
    return {
        "hidden_states": _randn(model, generator, batch, config.in_channels, latent, latent),
        "encoder_hidden_states": _randn(model, generator, batch, 300, config.caption_channels),
        "encoder_attention_mask": torch.ones((batch, 300), device=model.device),
        "timestep": torch.full((batch,), timestep, device=model.device),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _flux_inputs(model: torch.nn.Module, images: int, resolution: int, timestep: int, generator: torch.Generator):
    """One row per image (guidance-distilled): packed latents with their position ids, 512 T5 tokens,
    pooled CLIP text, the timestep as ``t / 1000`` and the guidance scale."""
    config, side = model.config, resolution // 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    return {
        "hidden_states": _randn(model, generator, images, side * side, config.in_channels),
        "encoder_hidden_states": _randn(model, generator, images, 512, config.joint_attention_dim),
        "pooled_projections": _randn(model, generator, images, config.pooled_projection_dim),
        "timestep": torch.full((images,), timestep / 1000, device=model.device),
        "img_ids": ids.reshape(-1, 3).to(model.device, model.dtype),
        "txt_ids": torch.zeros(512, 3, device=model.device, dtype=model.dtype),
        "guidance": torch.full((images,), FLUX_GUIDANCE, device=model.device),
    }


@dataclass(frozen=True)
class TransformerArch:
    """A diffusion transformer architecture and the inputs its pipeline gives one forward.

    Attributes:
        model: The diffusers class.
        config: Its keyword config.
        inputs: One forward's inputs (see the module's docstring).
        guided: Whether its pipeline runs classifier-free guidance (a batch of 2 per image).
    """

    model: type[torch.nn.Module]
    config: dict[str, Any]
    inputs: Inputs
    guided: bool = True

    def build(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        flux_blocks: tuple[int, int] = FLUX_BLOCKS,
    ) -> torch.nn.Module:
        """The model with seeded random weights (diffusers' default init), made on ``device`` in ``dtype``;
        a Flux architecture with ``flux_blocks`` (double, single) blocks."""
        config = self.config
        if self.model is FluxTransformer2DModel:
            config = {**config, "num_layers": flux_blocks[0], "num_single_layers": flux_blocks[1]}
        torch.manual_seed(seed)
        with torch.device(device):
            model = self.model.from_config(config)
        # Cast only when needed: ModelMixin.to(dtype=...) warns even for a no-op cast.
        return (model if dtype == model.dtype else model.to(dtype=dtype)).eval()

    def tiny(self, config: dict[str, Any]) -> TransformerArch:
        """This architecture with a test-sized ``config``."""
        return replace(self, config=config)


_SD3 = TransformerArch(SD3Transformer2DModel, SD35_MEDIUM, _sd3_inputs)
_PIXART = TransformerArch(PixArtTransformer2DModel, PIXART_SIGMA, _pixart_inputs)
_FLUX = TransformerArch(FluxTransformer2DModel, FLUX_DEV, _flux_inputs, guided=False)

#: Architectures selectable with ``--arch``.
TRANSFORMER_ARCHS: dict[str, TransformerArch] = {
    "sd35-medium": _SD3,
    "pixart-sigma": _PIXART,
    "flux": _FLUX,
    # Two blocks, the first with dual attention, the last context-pre-only; text widths kept small.
    "tiny-sd3": _SD3.tiny(
        {
            **SD35_MEDIUM,
            "sample_size": 8,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 16,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 32,
            "dual_attention_layers": [0],
        }
    ),
    "tiny-pixart": _PIXART.tiny(
        {
            **PIXART_SIGMA,
            "sample_size": 8,
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "norm_num_groups": 1,
        }
    ),
    "tiny-flux": _FLUX.tiny(
        {**FLUX_DEV, "attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": [4, 6, 6]}
    ),
}
