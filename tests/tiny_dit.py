"""Tiny diffusion transformers built from configs, for offline tests: SD3.5 (dual attention, qk-norm),
Flux (one double- and one single-stream block) and PixArt, with their calls' inputs.

Random weights (seeded); small enough that a forward takes milliseconds on a CPU. The latent is
16x16, so SD3's and PixArt's patch grid (patch 2) and Flux's packed grid are 8x8 tokens.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

TEXT_TOKENS = 6
LATENT = 16


def tiny_sd3(seed: int = 0, dual: bool = True) -> SD3Transformer2DModel:
    """SD3.5-shaped: two joint blocks (the first with SD3.5's second attention), qk-norm, the last block
    ``context_pre_only``."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=LATENT,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,) if dual else (),
        qk_norm="rms_norm",
    )


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    """One double-stream and one single-stream block, rotary axes (4, 6, 6) over 16-channel heads."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    """PixArt-shaped: two ``ada_norm_single`` blocks with cross-attention to the text."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=LATENT,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )


def flux_ids(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's (img_ids, txt_ids) for an h-by-w token grid, as its pipelines build them."""
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return img_ids.reshape(h * w, 3), torch.zeros(TEXT_TOKENS, 3)


def dit_inputs(kind: str, timestep: float, batch: int = 2, size: tuple[int, int] = (LATENT, LATENT), seed: int = 0):
    """Keyword arguments of one forward of a tiny ``kind`` ("sd3", "flux", "pixart") model at ``timestep``
    (the scheduler's, 0-1000; Flux receives it divided by 1000, as its pipelines pass it)."""
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    t = torch.full((batch,), float(timestep))
    if kind == "sd3":
        return dict(
            hidden_states=torch.randn(batch, 4, h, w, generator=generator),
            encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 32, generator=generator),
            pooled_projections=torch.randn(batch, 16, generator=generator),
            timestep=t,
            return_dict=False,
        )
    if kind == "flux":
        img_ids, txt_ids = flux_ids(h // 2, w // 2)
        return dict(
            hidden_states=torch.randn(batch, h * w // 4, 16, generator=generator),
            encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 32, generator=generator),
            pooled_projections=torch.randn(batch, 16, generator=generator),
            timestep=t / 1000,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )
    if kind == "pixart":
        return dict(
            hidden_states=torch.randn(batch, 4, h, w, generator=generator),
            encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 32, generator=generator),
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )
    raise ValueError(f"kind must be 'sd3', 'flux' or 'pixart', got {kind!r}")


TINY_DITS = {"sd3": tiny_sd3, "flux": tiny_flux, "pixart": tiny_pixart}
