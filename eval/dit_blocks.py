"""The blocks of a diffusion transformer (SD3 / SD3.5, Flux, PixArt-alpha / Sigma) that the peers and the
ceiling change, their image-attention layers, and what a call of the model says about its image.

AgentSD's design for these models (``agentsd-dit.md``) changes the attention over image tokens of
every block: the joint attention of an SD3 block (``attn``) and its second, image-only self-attention
(``attn2``, SD3.5's MMDiT-X blocks), the attention of both Flux block kinds (double stream: image and
text apart, then joint; single stream: one sequence, text first), and the self-attention ``attn1`` of a
PixArt ``BasicTransformerBlock``. :func:`blocks` lists them as eval/ patches them (every block), and
:func:`image_attentions` names the layers of one, so that ToDo (``todo_dit.py``) and the ceiling
(``method_parts.py``) change the same ones.

A call's image is a token grid (h, w) at the patch level: the latent's (H / p, W / p) for SD3 and
PixArt (``hidden_states`` [B, C, H, W], patch p = 2), Flux's from its image ids (row, column of each
packed token, read on the host: one value per call). Its noise level is the timestep over 1000, or
the timestep itself for Flux, whose pipeline passes ``t / 1000``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock

#: The diffusion transformers eval/ runs its peers on.
TRANSFORMERS = (SD3Transformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel)


def find_transformer(target: Any) -> torch.nn.Module | None:
    """The diffusion transformer of ``target`` (a pipeline's ``.transformer``, or the model), else ``None``."""
    model = getattr(target, "transformer", target)
    return model if isinstance(model, TRANSFORMERS) else None


def blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every block of ``model`` (double- then single-stream for Flux), with its path, in the order they run."""
    lists = ("transformer_blocks", "single_transformer_blocks")
    return [(f"{name}.{index}", block) for name in lists for index, block in enumerate(getattr(model, name, ()))]


def image_attentions(block: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """The attention layers of ``block`` that attend over its image tokens, each with whether it is joint
    (text tokens in the same attention: SD3's ``attn``, both Flux blocks') or plain self-attention."""
    if isinstance(block, BasicTransformerBlock):
        return [(block.attn1, False)]
    if isinstance(block, JointTransformerBlock) and block.attn2 is not None:
        return [(block.attn, True), (block.attn2, False)]
    return [(block.attn, True)]


def joint_text_first(model: torch.nn.Module) -> bool:
    """Whether ``model``'s joint attention puts the text tokens before the image ones (Flux) or after (SD3)."""
    return isinstance(model, FluxTransformer2DModel)


def read_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple[int, int], Any]:
    """The image token grid (h, w) and the timestep of one call of ``model``."""
    bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs).arguments
    if isinstance(model, FluxTransformer2DModel):
        ids = bound["img_ids"]
        last = (ids[0] if ids.ndim == 3 else ids)[-1].tolist()  # the last token's (0, row, column)
        return (int(last[1]) + 1, int(last[2]) + 1), bound["timestep"]
    hidden, patch = bound["hidden_states"], model.config.patch_size
    return (hidden.shape[-2] // patch, hidden.shape[-1] // patch), bound["timestep"]


def timestep_scale(model: torch.nn.Module) -> int:
    """What ``model``'s timesteps are measured against: 1 for Flux (``t / 1000``), 1000 for the others."""
    return 1 if isinstance(model, FluxTransformer2DModel) else 1000
