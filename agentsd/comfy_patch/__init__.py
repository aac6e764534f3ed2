"""AgentSD for ComfyUI: the adapter behind the "AgentSD" node (``comfyui-agentsd/``).

It imports ComfyUI (``comfy``), so it loads only inside a ComfyUI engine; ``import agentsd`` does not
import it. It imports no diffusers, nor does the engine-neutral core it runs on.
"""

from .blocks import BlockRun, BlockState, ModelState, noise_level
from .model import SUPPORTED_FAMILIES, apply_agentsd, block_sites, check_supported, patched_state, site_key
from .node import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, AgentSDNode

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "SUPPORTED_FAMILIES",
    "AgentSDNode",
    "BlockRun",
    "BlockState",
    "ModelState",
    "apply_agentsd",
    "block_sites",
    "check_supported",
    "noise_level",
    "patched_state",
    "site_key",
]
