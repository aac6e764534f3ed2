"""AgentSD for diffusers: agent attention on ToMe token merging, training-free.

import agentsd
agentsd.apply_patch(pipe, ratio=0.4)   # the published two-phase recipe
image = pipe("a photo of a corgi").images[0]
agentsd.remove_patch(pipe)             # back to exactly the pipeline it was

The diffusers adapter (``apply_patch`` and the names beside it) is imported on first use, so that
``import agentsd`` and the ComfyUI node (``agentsd.comfy_patch``) need no diffusers.
"""

import typing as _typing

from .attention import agent_attention
from .config import AgentSDConfig, Phase, recipe
from .merge import MergePlan, TokenMerge, plan_merge
from .selection import BlockSite

if _typing.TYPE_CHECKING:  # what type checkers see; at run time these come from __getattr__ below
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

#: The names imported on first use, each with the submodule it comes from (a submodule's own name: the
#: submodule itself). The submodules listed are those ``import agentsd`` used to load through the
#: diffusers adapter, so ``agentsd.block`` still works without an import of its own.
_LAZY = {
    "PatchSummary": "diffusers_patch",
    "apply_patch": "diffusers_patch",
    "compile_unet": "diffusers_patch",
    "is_patched": "diffusers_patch",
    "patch_summary": "diffusers_patch",
    "patched": "diffusers_patch",
    "remove_patch": "diffusers_patch",
    "select_blocks": "diffusers_patch",
    "top_attention_downsample": "diffusers_patch",
    "diffusers_patch": "diffusers_patch",
    "block": "block",
    "schedule": "schedule",
}


def __getattr__(name: str) -> _typing.Any:
    """Import a name of :data:`_LAZY` on first use (PEP 562); later uses find it in the module.

    Raises:
        ModuleNotFoundError: diffusers is not installed, saying what to install.
        AttributeError: ``agentsd`` has no such name.
    """
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "diffusers":
            raise
        raise ModuleNotFoundError(
            f"agentsd.{name} patches diffusers models, and diffusers is not installed: "
            "python -m pip install diffusers (whole pipelines also need transformers and accelerate, "
            "the extra agentsd[pipelines])",
            name="diffusers",
        ) from error
    value = module if _LAZY[name] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, those not imported yet included."""
    return sorted(set(globals()) | set(_LAZY))
