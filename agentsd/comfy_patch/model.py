"""AgentSD on a ComfyUI model: which models and blocks, and the patches on a clone of the model.

:func:`apply_agentsd` is what the node runs. It never touches the model it is given: it patches
a ``clone()`` through ComfyUI's own patch points (``attn1_patch``, ``attn1_replace``,
``attn1_output_patch`` and one object patch per block), so ComfyUI's unpatching restores the model
and every patch set before or after AgentSD keeps running. The method itself (block selection,
merge planning, agent attention, the schedule) is ``agentsd``'s own, shared with the diffusers adapter.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import comfy.supported_models as families
from comfy.ldm.modules.attention import BasicTransformerBlock
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample
from comfy.patcher_extension import WrappersMP

from ..config import AgentSDConfig
from ..schedule import phase_spans
from ..selection import BlockSite, select_sites
from .blocks import OPTIONS_KEY, BlockKey, BlockState, ModelState, input_recorder
from .dit import apply_dit, is_supported_dit

logger = logging.getLogger("agentsd")

#: The UNet model families AgentSD runs on (and their subclasses: SSD-1B, Vega, KOALA, instruct-pix2pix,
#: unCLIP): SD 1.x, SD 2.x (with the x4 upscaler) and SDXL with its refiner. The diffusion
#: transformers it runs on are SD3 / SD3.5 and Flux (:func:`~agentsd.comfy_patch.dit.is_supported_dit`).
SUPPORTED_FAMILIES = (families.SD15, families.SD20, families.SDXL, families.SDXLRefiner)
SUPPORTED = "SD 1.x, SD 2.x, SDXL, SD3 / SD3.5 and Flux (dev, schnell) models"


def model_family(model: Any) -> str:
    """The name of a ``ModelPatcher``'s model family (``"SD15"``, ``"SDXL"``, ``"Flux"``, ...)."""
    return type(model.model.model_config).__name__


def is_supported_unet(model: Any) -> bool:
    """Whether a ``ModelPatcher`` holds an SD 1.x, 2.x or SDXL UNet."""
    return isinstance(model.model.model_config, SUPPORTED_FAMILIES) and type(model.model.diffusion_model) is UNetModel


def check_supported(model: Any) -> None:
    """Refuse, with the model's family in the message, any model that is not SD 1.x, 2.x, SDXL, SD3 or Flux.

    Raises:
        ValueError: Another family (Stable Cascade, video and audio models, AuraFlow, Flux 2, ...), or a
            stack that AgentSD cannot join (AgentSD already on it, or ComfyUI's ToMe node).
    """
    if not is_supported_unet(model) and not is_supported_dit(model):
        raise ValueError(
            f"AgentSD patches {SUPPORTED}; this model is {model_family(model)} "
            f"({type(model.model.diffusion_model).__name__})"
        )
    options = model.model_options.get("transformer_options", {})
    if OPTIONS_KEY in options:
        raise ValueError("this model already has AgentSD: apply one AgentSD node, on the unpatched model")
    _refuse_tome(options)


def is_comfy_tome(patch: Any) -> bool:
    """Whether an ``attn1_patch`` is ComfyUI's ToMe node's (``comfy_extras/nodes_tomesd.py``).

    The file the patch was defined in decides, not its module's name: a server loads
    ``comfy_extras`` by path (``nodes.load_custom_node``), which names the module after the file's path
    (``/.../comfy_extras/nodes_tomesd``), while ``import comfy_extras.nodes_tomesd`` names it
    ``comfy_extras.nodes_tomesd``. A function's ``__code__.co_filename`` is the source file's path
    whichever way it was loaded; a patch without code (a callable object) is judged by its module's name,
    split at dots and either slash, so every form of that name ends in ``comfy_extras``, ``nodes_tomesd``.
    """
    code = getattr(patch, "__code__", None)
    if code is not None and re.split(r"[\\/]", code.co_filename)[-2:] == ["comfy_extras", "nodes_tomesd.py"]:
        return True
    return re.split(r"[\\/.]", getattr(patch, "__module__", None) or "")[-2:] == ["comfy_extras", "nodes_tomesd"]


def _refuse_tome(options: dict[str, Any]) -> None:
    """Refuse a model that also has ComfyUI's ToMe node: both would merge the same tokens."""
    if any(is_comfy_tome(patch) for patch in options.get("patches", {}).get("attn1_patch", [])):
        raise ValueError(
            "this model has ComfyUI's ToMe node (TomePatchModel) and AgentSD: both merge the tokens of "
            "self-attention; use one of the two"
        )


def refuse_tome_at_run(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """An ``APPLY_MODEL`` wrapper: refuses a ToMe node applied after AgentSD, before the UNet runs."""
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
    _refuse_tome(options)
    return executor(*args, **kwargs)


def block_sites(diffusion_model: UNetModel) -> list[BlockSite]:
    """Every transformer block of a ComfyUI UNet, in the order they run, with its level.

    The level starts at 1 and doubles after each ``Downsample``, halves after each ``Upsample``.
    """
    sites: list[BlockSite] = []
    downsample = 1
    for prefix, blocks in (
        ("input_blocks", diffusion_model.input_blocks),
        ("middle_block", [diffusion_model.middle_block]),
        ("output_blocks", diffusion_model.output_blocks),
    ):
        for number, block in enumerate(blocks):
            path = f"{prefix}.{number}" if prefix != "middle_block" else prefix
            for name, module in block.named_modules(prefix=path):
                if isinstance(module, BasicTransformerBlock):
                    sites.append(BlockSite(name, module, downsample))
            for module in block.modules():
                if isinstance(module, Downsample):
                    downsample *= 2
                elif isinstance(module, Upsample):
                    downsample //= 2
    return sites


def site_key(site: BlockSite) -> BlockKey:
    """The ``(block name, number, index)`` ComfyUI gives a block's patches, from its path."""
    parts = site.name.split(".")
    index = int(parts[-1])
    if parts[0] == "middle_block":
        return ("middle", 0, index)
    return ("input" if parts[0] == "input_blocks" else "output", int(parts[1]), index)


def apply_agentsd(model: Any, config: AgentSDConfig) -> Any:
    """A clone of ComfyUI model ``model`` (a ``ModelPatcher``) that runs AgentSD.

    Args:
        model: The model, as a MODEL input gives it; left as it is.
        config: The settings. Only self-attention merges here (``merge_crossattn`` and
            ``merge_mlp`` are diffusers-only).

    Returns:
        The patched clone.

    Raises:
        ValueError: An unsupported model or stack (:func:`check_supported`), or settings the node
            does not offer.
    """
    if config.merge_crossattn or config.merge_mlp or not config.merge_attn:
        raise ValueError(
            "in ComfyUI AgentSD merges self-attention only: merge_attn=True, merge_crossattn=merge_mlp=False"
        )
    check_supported(model)
    if is_supported_dit(model):
        return apply_dit(model, config, model_family(model))
    sites = select_sites(block_sites(model.model.diffusion_model), config.max_downsample)
    patched = model.clone()
    state = ModelState(config, model.model)
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for index, site in enumerate(sites):
        key = site_key(site)
        previous = replaces.get(key, replaces.get(key[:2]))
        block = BlockState(state, index, site.downsample, site.name, previous_replace=previous)
        state.blocks[key] = block
        norm1 = f"diffusion_model.{site.name}.norm1"
        # The model's own norm1, even while a patched clone of it is loaded (the clones share one model).
        patched.add_object_patch(norm1, input_recorder(model.get_model_object(norm1), block))
        patched.set_model_attn1_replace(block.attend, *key)
    # Read after the replaces: ComfyUI sets each on a new copy of the options.
    options = patched.model_options.setdefault("transformer_options", {})
    patches = options.setdefault("patches", {})
    # Merging last and unmerging first: every other attn1 patch sees all the tokens, as without AgentSD.
    patches["attn1_patch"] = [*patches.get("attn1_patch", []), state.merge]
    patches["attn1_output_patch"] = [state.unmerge, *patches.get("attn1_output_patch", [])]
    options[OPTIONS_KEY] = state
    if hasattr(patched, "add_wrapper_with_key"):  # ComfyUI's wrappers (since late 2024)
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, OPTIONS_KEY, refuse_tome_at_run)
    logger.info("agentsd: %s", describe(state, model_family(model)))
    return patched


def describe(state: ModelState, family: str) -> str:
    """One line: which blocks of the model run what, in which span of the noise schedule."""
    levels = sorted({block.downsample for block in state.blocks.values()})
    spans = phase_spans(state.config.phases, 1000)
    phases = "; ".join(f"{span}: {phase.describe()}" for span, phase in zip(spans, state.config.phases))
    return f"{family}, {len(state.blocks)} transformer blocks at downsample {levels}; {phases}"


def patched_state(model: Any) -> ModelState | None:
    """The AgentSD state of a model patched by :func:`apply_agentsd` (or a clone of it), or ``None``."""
    return model.model_options.get("transformer_options", {}).get(OPTIONS_KEY)
