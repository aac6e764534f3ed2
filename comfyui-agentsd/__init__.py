"""AgentSD for ComfyUI: the "AgentSD" node (model_patches/unet), MODEL in, MODEL out.

Install: put this folder in ``ComfyUI/custom_nodes/`` and install ``agentsd`` into ComfyUI's Python
(``python -m pip install agentsd``; ComfyUI-Manager does it from ``requirements.txt``). The node
itself is ``agentsd.comfy_patch``: the method is the package's, shared with its diffusers patch.
"""

try:
    from agentsd.comfy_patch.node import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as error:
    if error.name != "agentsd":
        raise
    raise ModuleNotFoundError(
        "the AgentSD node needs the agentsd package in ComfyUI's Python: python -m pip install agentsd"
    ) from error

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
