"""The transformer blocks AgentSD patches in a diffusers model, and the parts of each that merge.

In a UNet the blocks are the ``BasicTransformerBlock`` objects of its spatial transformers
(``Transformer2DModel``, and the spatial half of SVD's ``TransformerSpatioTemporalModel``: see
``models``), whose tokens are the pixels of one feature map. Temporal transformers (AnimateDiff's
motion modules, SVD's temporal blocks, whose tokens are frames) are not spatial: they are never
patched. In a diffusion transformer every block sees the whole patch grid:
SD3's ``JointTransformerBlock``, Flux's double- and single-stream blocks, PixArt's
``BasicTransformerBlock``.

Each block names its merging parts by kind (:data:`StageKind`): ``"self"`` attention (agents may
stand in), ``"joint"`` attention of image and text (image rows through agents, text rows exact),
``"cross"`` attention (ToMe on the queries), the feed-forward ``"ff"``.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from diffusers.models.attention import BasicTransformerBlock

from ..config import AgentSDConfig
from ..selection import BlockSite, select_sites, top_attention_level
from .backbones import backbone_of, find_backbone, is_unet
from .models import SPATIAL_TRANSFORMERS, TEMPORAL_BLOCKS, refuse_unsupported

StageKind = Literal["self", "joint", "cross", "ff"]

#: Which setting turns each kind of stage on.
STAGE_SETTINGS = {"self": "merge_attn", "joint": "merge_attn", "cross": "merge_crossattn", "ff": "merge_mlp"}


def transformer_blocks(model: torch.nn.Module) -> list[BlockSite]:
    """Every block of ``model`` that AgentSD can patch, with its downsample factor, in the order they run."""
    return unet_blocks(model) if is_unet(model) else dit_blocks(model)


def dit_blocks(model: torch.nn.Module) -> list[BlockSite]:
    """A diffusion transformer's blocks, double-stream before single-stream, each seeing the whole grid:
    the latent's at the patch size (Flux: its token grid, read from ``img_ids``, at 1)."""
    downsample = 1 if backbone_of(model).family == "Flux" else model.config.patch_size
    return [
        BlockSite(f"{name}.{index}", block, downsample)
        for name in ("transformer_blocks", "single_transformer_blocks")
        for index, block in enumerate(getattr(model, name, ()))
    ]


def stage_kinds(block: torch.nn.Module) -> dict[str, StageKind]:
    """The parts of ``block`` that can run on merged tokens, by attribute name, in the order they run."""
    name = type(block).__name__
    if isinstance(block, BasicTransformerBlock):
        stages = {"attn1": "self", "attn2": "cross"} if block.attn2 is not None else {"attn1": "self"}
    elif name == "JointTransformerBlock":
        stages = {"attn": "joint", "attn2": "self"} if block.attn2 is not None else {"attn": "joint"}
    elif name == "FluxTransformerBlock":
        stages = {"attn": "joint"}
    elif name == "FluxSingleTransformerBlock":
        if "encoder_hidden_states" not in inspect.signature(type(block).forward).parameters:
            raise TypeError(
                "agentsd patches Flux with diffusers >= 0.35, whose single-stream blocks take the text and "
                "image tokens apart; upgrade diffusers (python -m pip install -U diffusers)"
            )
        # Its MLP branch runs (first) beside attention and is joined to it per token by proj_out, so
        # merging the branch's projection and copying its rows back is the branch on merged tokens.
        return {"proj_mlp": "ff", "attn": "joint"}
    else:
        raise TypeError(f"agentsd cannot patch a {name}")
    return stages | {"ff": "ff"}


def merging_stages(config: AgentSDConfig, block: torch.nn.Module) -> list[tuple[str, StageKind]]:
    """The parts of ``block`` that run on merged tokens under ``config``, in the order they run."""
    return [(name, kind) for name, kind in stage_kinds(block).items() if getattr(config, STAGE_SETTINGS[kind])]


def unet_blocks(unet: torch.nn.Module) -> list[BlockSite]:
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


def select_blocks(
    model: Any, max_downsample: int | None = None, blocks: tuple[str, ...] | list[str] | None = None
) -> list[BlockSite]:
    """The transformer blocks that ``agentsd.apply_patch(model, max_downsample=..., blocks=...)`` patches.

    The same selection for every tool that wants AgentSD's blocks (peers patched at the same level,
    benchmarks of one block): a public function, so that nobody needs a trial patch to find them.
    By default a UNet's highest-resolution attention level, and every block of a diffusion
    transformer (each sees the whole grid).

    Args:
        model: A diffusers pipeline with a ``.unet`` or ``.transformer``, or that model.
        max_downsample: As :class:`agentsd.AgentSDConfig`'s; ``None`` for the top attention level.
        blocks: As :class:`agentsd.AgentSDConfig`'s: only the blocks of these names (or name
            prefixes, such as ``"single_transformer_blocks"``); ``None`` for all of the level.

    Returns:
        :class:`~agentsd.selection.BlockSite` objects (``name``, ``module``, ``downsample``), in the
        order the blocks run.

    Raises:
        ValueError: A name in ``blocks`` matches no block of the model.
    """
    denoiser = find_backbone(model)
    refuse_unsupported(model, denoiser)
    return choose_sites(transformer_blocks(denoiser), max_downsample, blocks)


def choose_sites(
    sites: list[BlockSite], max_downsample: int | None, blocks: tuple[str, ...] | list[str] | None
) -> list[BlockSite]:
    """Of a model's ``sites``, those ``max_downsample`` and ``blocks`` select (see :func:`select_blocks`)."""
    sites = select_sites(sites, max_downsample)
    if blocks is None:
        return sites
    return [site for site in sites if any(_names(site.name, name) for name in _known(sites, blocks))]


def _names(site: str, name: str) -> bool:
    """Whether block name or prefix ``name`` names block ``site``."""
    return site == name or site.startswith(name + ".")


def _known(sites: list[BlockSite], blocks: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = [name for name in blocks if not any(_names(site.name, name) for site in sites)]
    if unknown:
        examples = ", ".join(site.name for site in sites[:3])
        raise ValueError(
            f"blocks names no block of this model: {unknown}; accepted: the names agentsd.select_blocks(model) "
            f"lists (such as {examples}) or their prefixes"
        )
    return tuple(blocks)


def top_attention_downsample(model: Any) -> int:
    """How many times coarser than the latent ``model``'s highest-resolution attention runs (1, or 2 on SDXL)."""
    return top_attention_level(transformer_blocks(find_backbone(model)))
