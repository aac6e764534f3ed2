"""Finding a diffusers model's UNet and the transformer blocks AgentSD patches in it.

The blocks are the ``BasicTransformerBlock`` objects of the UNet's spatial transformers
(``Transformer2DModel``, and the spatial half of SVD's ``TransformerSpatioTemporalModel``: see
``models``), whose tokens are the pixels of one feature map. Temporal transformers
(AnimateDiff's motion modules, SVD's temporal blocks, whose tokens are frames) are not spatial:
they are never patched.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock

from ..selection import BlockSite, select_sites, top_attention_level
from .models import SPATIAL_TRANSFORMERS, TEMPORAL_BLOCKS, refuse_unsupported

UNET_PARTS = ("down_blocks", "up_blocks", "conv_in")


def is_unet(module: Any) -> bool:
    """Whether ``module`` is a diffusers UNet (``UNet2DConditionModel``, ``UNetMotionModel``, ...)."""
    return isinstance(module, torch.nn.Module) and all(hasattr(module, name) for name in UNET_PARTS)


def find_unet(model: Any) -> torch.nn.Module:
    """The UNet of a pipeline, or ``model`` itself if it is one.

    Raises:
        TypeError: ``model`` has no UNet (a transformer-based pipeline, a VAE, ...); the message says why.
    """
    unet = getattr(model, "unet", model)
    if is_unet(unet):
        return unet
    transformer = getattr(model, "transformer", model)
    if isinstance(transformer, torch.nn.Module) and "Transformer" in type(transformer).__name__:
        raise TypeError(
            f"{type(model).__name__} is built on a transformer ({type(transformer).__name__}), not a UNet: "
            "AgentSD patches the UNet of Stable Diffusion 1.x, 2.x and SDXL pipelines; transformer models "
            "(SD3, Flux, PixArt, DiT, ...) are not supported"
        )
    raise TypeError(
        f"model must be a diffusers pipeline with a `.unet` or a UNet2DConditionModel, got {type(model).__name__}"
    )


def transformer_blocks(unet: torch.nn.Module) -> list[BlockSite]:
    """Every spatial ``BasicTransformerBlock`` of ``unet`` with its downsample factor, in the order they run.

    The factor follows from where the block sits: down block i and up block (n - 1 - i) work at
    2**i, the mid block at the coarsest level.
    """
    levels = len(unet.down_blocks)
    scopes = [(f"down_blocks.{i}", unet.down_blocks[i], 2**i) for i in range(levels)]
    if getattr(unet, "mid_block", None) is not None:
        scopes.append(("mid_block", unet.mid_block, 2 ** (levels - 1)))
    scopes += [(f"up_blocks.{i}", unet.up_blocks[i], 2 ** (levels - 1 - i)) for i in range(len(unet.up_blocks))]
    found = []
    for prefix, scope, downsample in scopes:
        for name, module in scope.named_modules():
            if not isinstance(module, SPATIAL_TRANSFORMERS):
                continue
            for index, block in enumerate(module.transformer_blocks):
                if isinstance(block, BasicTransformerBlock):
                    found.append(BlockSite(f"{prefix}.{name}.transformer_blocks.{index}", block, downsample))
    return found


def unsupported_blocks(unet: torch.nn.Module) -> list[str]:
    """Class names of the transformer blocks of ``unet`` that are neither ``BasicTransformerBlock`` nor temporal
    (left unpatched)."""
    return sorted(
        {
            type(module).__name__
            for module in unet.modules()
            if type(module).__name__.endswith("TransformerBlock")
            and not isinstance(module, BasicTransformerBlock)
            and type(module).__name__ not in TEMPORAL_BLOCKS
        }
    )


def select_blocks(model: Any, max_downsample: int | None = None) -> list[BlockSite]:
    """The transformer blocks that ``agentsd.apply_patch(model, max_downsample=...)`` patches.

    The same selection for every tool that wants AgentSD's blocks (peers patched at the same level,
    benchmarks of one block): a public function, so that nobody needs a trial patch to find them.

    Args:
        model: A diffusers pipeline with a ``.unet``, or the UNet.
        max_downsample: As :class:`agentsd.AgentSDConfig`'s; ``None`` for the top attention level.

    Returns:
        :class:`~agentsd.selection.BlockSite` objects (``name``, ``module``, ``downsample``), in the
        order the blocks run.
    """
    unet = find_unet(model)
    refuse_unsupported(model, unet)
    return select_sites(transformer_blocks(unet), max_downsample)


def top_attention_downsample(model: Any) -> int:
    """How many times coarser than the latent ``model``'s highest-resolution attention runs (1, or 2 on SDXL)."""
    return top_attention_level(transformer_blocks(find_unet(model)))
