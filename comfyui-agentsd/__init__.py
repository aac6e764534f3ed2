"""AgentSD for ComfyUI: the "AgentSD" node (model_patches/unet), MODEL in, MODEL out.

Install (README, "ComfyUI"): get the agentsd repository, and link this folder into ComfyUI's
``custom_nodes/``; nothing is installed into ComfyUI's Python (the node needs only torch, ComfyUI's)::

    git clone <agentsd repository> /path/to/agentsd
    ln -s /path/to/agentsd/comfyui-agentsd /path/to/ComfyUI/custom_nodes/comfyui-agentsd

The node itself is ``agentsd.comfy_patch``, the method the package's own, shared with its diffusers
patch. This folder loads the ``agentsd`` package of the repository it sits in (the link is followed),
so the node and the package are always of one version; a folder copied out of the repository loads
an ``agentsd`` installed into ComfyUI's Python instead
(``python -m pip install --no-deps /path/to/agentsd``).
"""

import importlib.util
import sys
from pathlib import Path


def _load_agentsd_from_repository() -> None:
    """Import the ``agentsd`` package of the repository this folder sits in, if it does, as ``agentsd``.

    Only the package is loaded, from its folder: the repository's root never goes on ``sys.path``,
    where its other folders (``tests``, ``eval``, ...) would shadow modules of other custom nodes.
    An ``agentsd`` already imported in this process is kept.
    """
    package = Path(__file__).resolve().parent.parent / "agentsd"
    if "agentsd" in sys.modules or not (package / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "agentsd", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["agentsd"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["agentsd"]
        raise


_load_agentsd_from_repository()

try:
    from agentsd.comfy_patch.node import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as error:
    if error.name != "agentsd":
        raise
    raise ModuleNotFoundError(
        "the AgentSD node needs the agentsd package: link this folder into custom_nodes/ from the agentsd "
        "repository (ln -s /path/to/agentsd/comfyui-agentsd custom_nodes/) instead of copying it, or "
        "install the repository into ComfyUI's Python: python -m pip install --no-deps /path/to/agentsd",
        name="agentsd",
    ) from error

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
