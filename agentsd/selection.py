"""Which transformer blocks AgentSD patches: the rule, for any engine.

An engine adapter lists the transformer blocks of its UNet as :class:`BlockSite` objects (where each
sits, and how much coarser than the latent its token grid is); :func:`select_sites` keeps those the
method patches. By default that is the highest-resolution attention level only: the level with the
most tokens, where attention costs the most and merging saves the most (downsample 1 on SD 1.x and
2.x, 2 on SDXL, which has no attention at full latent resolution).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockSite:
    """One transformer block of a UNet, as an engine adapter found it.

    Attributes:
        name: Its path in the model (``"down_blocks.0.attentions.0.transformer_blocks.0"``).
        module: The block itself.
        downsample: How many times coarser than the latent its token grid is (1 = the latent's).
    """

    name: str
    module: Any
    downsample: int


def top_attention_level(sites: Sequence[BlockSite]) -> int:
    """The downsample factor of the highest-resolution level that has a transformer block.

    Raises:
        ValueError: ``sites`` is empty.
    """
    if not sites:
        raise ValueError("the model has no transformer block, so no attention level")
    return min(site.downsample for site in sites)


def select_sites(sites: Sequence[BlockSite], max_downsample: int | None = None) -> list[BlockSite]:
    """The sites AgentSD patches: those at most ``max_downsample`` times coarser than the latent.

    Args:
        sites: Every transformer block of the model, in the order they run.
        max_downsample: The coarsest level patched; ``None`` for :func:`top_attention_level`.

    Returns:
        The selected sites, in the order they run (empty if ``max_downsample`` is below every level).
    """
    limit = max_downsample if max_downsample is not None else top_attention_level(sites)
    return [site for site in sites if site.downsample <= limit]
