"""Tiny diffusion transformers built from configs, for offline tests: SD3.5 (dual attention, qk-norm),
Flux (one double- and one single-stream block) and PixArt, with their calls' inputs.

Random weights (seeded); small enough that a forward takes milliseconds on a CPU. The latent is
16x16, so SD3's and PixArt's patch grid (patch 2) and Flux's packed grid are 8x8 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

TEXT_TOKENS = 6
LATENT = 16


def tiny_sd3(seed: int = 0, dual: bool = True, channels: int = 4) -> SD3Transformer2DModel:
    """SD3.5-shaped: two joint blocks (the first with SD3.5's second attention), qk-norm, the last block
    ``context_pre_only``; ``channels`` latent channels."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=LATENT,
        patch_size=2,
        in_channels=channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=channels,
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


def _tiny_vae(seed: int = 0, channels: int = 4):
    """tests/tiny.py's VAE with SD3 / Flux's latent shift and scale."""
    from tiny import tiny_vae

    return tiny_vae(seed, channels, shift_factor=0.0609, scaling_factor=1.5035)


#: The pipelines :func:`tiny_dit_pipeline` builds.
DIT_PIPELINES = (
    "sd3",
    "sd3-img2img",
    "sd3-inpaint",
    "sd3-controlnet",
    "flux",
    "flux-img2img",
    "flux-inpaint",
    "flux-fill",
    "flux-controlnet",
    "pixart-alpha",
    "pixart-sigma",
)


def tiny_dit_pipeline(kind: str):
    """A tiny pipeline of ``kind`` (one of :data:`DIT_PIPELINES`) without text encoders: call it with
    :func:`pipeline_inputs`, which passes the prompt embeddings."""
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    family, _, variant = kind.partition("-")
    channels = 16 if kind == "sd3-inpaint" else 4  # SD3's inpainting asks for SD3's 16 latent channels
    vae = _tiny_vae(channels=channels)
    if family == "sd3":
        names = {"": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline"}
        names |= {"inpaint": "StableDiffusion3InpaintPipeline", "controlnet": "StableDiffusion3ControlNetPipeline"}
        transformer = tiny_sd3(channels=channels)
        parts = dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae)
        parts |= {f"{name}{suffix}": None for name in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
        if variant == "controlnet":
            torch.manual_seed(1)
            parts["controlnet"] = diffusers.SD3ControlNetModel(
                sample_size=LATENT, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
                out_channels=4, pos_embed_max_size=32,
            )  # fmt: skip
    elif family == "flux":
        names = {"": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}
        names |= {"fill": "FluxFillPipeline", "controlnet": "FluxControlNetPipeline"}
        transformer = tiny_flux()
        if variant == "fill":  # latents, masked-image latents and the mask, packed 2x2
            torch.manual_seed(0)
            transformer = FluxTransformer2DModel(**{**transformer.config, "in_channels": 48, "out_channels": 16})
        shift = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16)
        scheduler = FlowMatchEulerDiscreteScheduler(max_image_seq_len=256, **shift)
        parts = dict(transformer=transformer, scheduler=scheduler, vae=vae)
        parts |= {f"{name}{suffix}": None for name in ("text_encoder", "tokenizer") for suffix in ("", "_2")}
        if variant == "controlnet":
            torch.manual_seed(1)
            parts["controlnet"] = diffusers.FluxControlNetModel(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
            )  # fmt: skip
    elif family == "pixart":
        names = {"alpha": "PixArtAlphaPipeline", "sigma": "PixArtSigmaPipeline"}
        parts = dict(transformer=tiny_pixart(), scheduler=DPMSolverMultistepScheduler(), vae=vae)
        parts |= {"text_encoder": None, "tokenizer": None}
    else:
        raise ValueError(f"kind must be one of {', '.join(DIT_PIPELINES)}; got {kind!r}")
    pipe = getattr(diffusers, names[variant])(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_inputs(kind: str, steps: int = 4, seed: int = 0) -> dict:
    """The keyword arguments of one tiny generation by a :func:`tiny_dit_pipeline` of ``kind`` (32x32 px)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(1, TEXT_TOKENS, 32, generator=generator)
    pooled = torch.randn(1, 16, generator=generator)
    image = torch.rand(1, 3, 32, 32, generator=generator)
    family, _, variant = kind.partition("-")
    inputs = dict(num_inference_steps=steps, height=32, width=32, output_type="pt")
    inputs["generator"] = torch.Generator().manual_seed(seed)
    if family == "pixart":
        mask = torch.ones(1, TEXT_TOKENS)
        inputs |= dict(prompt_embeds=text, prompt_attention_mask=mask, negative_prompt=None)
        inputs |= dict(negative_prompt_embeds=torch.zeros_like(text), negative_prompt_attention_mask=mask)
        return inputs | dict(use_resolution_binning=False)
    inputs |= dict(prompt_embeds=text, pooled_prompt_embeds=pooled)
    if family == "sd3":
        inputs |= dict(negative_prompt_embeds=torch.zeros_like(text), negative_pooled_prompt_embeds=pooled * 0)
    if variant in ("img2img", "inpaint"):
        inputs |= dict(image=image, strength=0.75)
    if variant in ("inpaint", "fill"):
        inputs |= dict(image=image, mask_image=torch.ones(1, 1, 32, 32))
    if variant == "controlnet":
        inputs |= dict(control_image=image, controlnet_conditioning_scale=0.5)
    return inputs


#: The pipelines :func:`tiny_text_pipeline` builds, with text encoders and tokenizers.
TEXT_PIPELINES = ("sd3", "flux", "pixart-sigma")


def tiny_t5(folder: str | Path, seed: int = 0):
    """A two-layer T5 encoder (``d_model`` 32) and a T5 tokenizer over tests/tiny.py's words, built in
    memory (a Unigram vocabulary, no sentencepiece model) and written to ``folder``."""
    from tiny import WORDS
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), (".", -1.0)]
    vocab += [(f"▁{word}", -1.0) for word in WORDS if word != "."]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config), tokenizer


def tiny_text_pipeline(kind: str, folder: str | Path):
    """A tiny pipeline of ``kind`` (one of :data:`TEXT_PIPELINES`) that takes prompts: SD3 with two
    CLIP text encoders and no T5 (its pipeline then gives T5's rows as zeros), Flux (guidance-distilled,
    like FLUX.1-dev) with CLIP and T5, PixArt-Sigma with T5. ``folder`` receives the tokenizer files."""
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    from tiny import _text_config, tiny_tokenizer
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    vae = _tiny_vae()
    if kind == "sd3":
        torch.manual_seed(1)
        clip_1 = CLIPTextModelWithProjection(_text_config(projection=True))
        clip_2 = CLIPTextModelWithProjection(_text_config(projection=True))
        # The CLIP rows (hidden sizes concatenated) are padded to joint_attention_dim, the pooled outputs
        # (projections concatenated) are pooled_projection_dim.
        joint = clip_1.config.hidden_size + clip_2.config.hidden_size
        pooled = clip_1.config.projection_dim + clip_2.config.projection_dim
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel.from_config(
            {**tiny_sd3().config, "joint_attention_dim": joint, "pooled_projection_dim": pooled}
        )
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae,
            text_encoder=clip_1,
            tokenizer=tiny_tokenizer(folder / "tokenizer"),
            text_encoder_2=clip_2,
            tokenizer_2=tiny_tokenizer(folder / "tokenizer_2"),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    elif kind == "flux":
        torch.manual_seed(1)
        clip = CLIPTextModel(_text_config(projection=False))
        t5, t5_tokenizer = tiny_t5(folder / "tokenizer_2")
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel.from_config(
            {
                **tiny_flux().config,
                "joint_attention_dim": t5.config.d_model,
                "pooled_projection_dim": clip.config.hidden_size,
                "guidance_embeds": True,
            }
        )
        shift = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16)
        pipe = diffusers.FluxPipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(max_image_seq_len=256, **shift),
            vae=vae,
            text_encoder=clip,
            tokenizer=tiny_tokenizer(folder / "tokenizer"),
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
        )
    elif kind == "pixart-sigma":
        t5, t5_tokenizer = tiny_t5(folder / "tokenizer")
        torch.manual_seed(0)
        transformer = PixArtTransformer2DModel.from_config(
            {**tiny_pixart().config, "caption_channels": t5.config.d_model}
        )
        pipe = diffusers.PixArtSigmaPipeline(
            transformer=transformer,
            scheduler=DPMSolverMultistepScheduler(),
            vae=vae,
            text_encoder=t5,
            tokenizer=t5_tokenizer,
        )
    else:
        raise ValueError(f"kind must be one of {', '.join(TEXT_PIPELINES)}; got {kind!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_text_pipeline(folder: str | Path, kind: str) -> Path:
    """Save :func:`tiny_text_pipeline` ``kind`` with ``save_pretrained``, so that ``from_pretrained(folder)``
    loads it offline."""
    folder = Path(folder)
    tiny_text_pipeline(kind, folder / "_scratch").save_pretrained(folder)
    return folder
