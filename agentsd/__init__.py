"""AgentSD for diffusers: agent attention on ToMe token merging, training-free.

import agentsd
agentsd.apply_patch(pipe, ratio=0.4)   # the published two-phase recipe
image = pipe("a photo of a corgi").images[0]
agentsd.remove_patch(pipe)             # back to exactly the pipeline it was
"""

from .attention import agent_attention
from .config import AgentSDConfig, Phase, recipe
from .diffusers_patch import (
    PatchSummary,
    apply_patch,
    compile_unet,
    is_patched,
    patch_summary,
    patched,
    remove_patch,
    select_blocks,
    top_attention_downsample,
)
from .merge import MergePlan, TokenMerge, plan_merge
from .selection import BlockSite

__version__ = "0.1.0"

__all__ = [
    "AgentSDConfig",
    "BlockSite",
    "MergePlan",
    "PatchSummary",
    "Phase",
    "TokenMerge",
    "agent_attention",
    "apply_patch",
    "compile_unet",
    "is_patched",
    "patch_summary",
    "patched",
    "plan_merge",
    "recipe",
    "remove_patch",
    "select_blocks",
    "top_attention_downsample",
]
