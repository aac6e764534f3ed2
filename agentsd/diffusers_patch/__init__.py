"""The diffusers adapter: AgentSD on a diffusers UNet, through patched ``forward`` methods."""

from .api import apply_patch, compile_unet, is_patched, patch_summary, patched, remove_patch
from .blocks import select_blocks, top_attention_downsample
from .summary import PatchedBlock, PatchSummary

__all__ = [
    "PatchSummary",
    "PatchedBlock",
    "apply_patch",
    "compile_unet",
    "is_patched",
    "patch_summary",
    "patched",
    "remove_patch",
    "select_blocks",
    "top_attention_downsample",
]
