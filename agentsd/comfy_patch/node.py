"""The "AgentSD" node: MODEL in, MODEL out, beside ComfyUI's own ToMe node.

Its inputs mirror :func:`agentsd.apply_patch`. ComfyUI checks the ranges and choices declared here
before a prompt runs, and names the input that is out of them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..config import FIXED_DEFAULTS, AgentSDConfig, recipe
from .model import apply_agentsd

#: The node's schedule choices: the published two phases, either of them on every step, or one
#: phase from the node's own ``agent_ratio``, ``sx`` and ``sy``.
SCHEDULES = ("recipe", "agent phase only", "ToMe phase only", "fixed")
MAX_DOWNSAMPLES = ("auto", "1", "2", "4", "8")


def node_config(
    ratio: float,
    schedule: str,
    agent_ratio: float,
    sx: int,
    sy: int,
    max_downsample: str,
    use_rand: bool,
    seed: int,
    fp32_attention: bool,
) -> AgentSDConfig:
    """The :class:`~agentsd.AgentSDConfig` of the node's inputs.

    Raises:
        ValueError: ``schedule`` or ``max_downsample`` is not one of the node's choices, or a value
            :class:`~agentsd.AgentSDConfig` refuses (its message names it).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if max_downsample not in MAX_DOWNSAMPLES:
        raise ValueError(f"max_downsample must be one of {', '.join(MAX_DOWNSAMPLES)}; got {max_downsample!r}")
    common = {
        "ratio": ratio,
        "max_downsample": None if max_downsample == "auto" else int(max_downsample),
        "use_rand": use_rand,
        "seed": seed,
        "attn_precision": "fp32" if fp32_attention else None,
    }
    if schedule == "fixed":
        return AgentSDConfig(schedule="fixed", agent_ratio=agent_ratio, sx=sx, sy=sy, **common)
    if schedule == "recipe":
        return AgentSDConfig(schedule="recipe", **common)
    agent_phase, tome_phase = recipe(ratio)
    only = agent_phase if schedule == "agent phase only" else tome_phase
    return AgentSDConfig(schedule=(replace(only, min_t=0.0),), **common)


class AgentSDNode:
    """ComfyUI node "AgentSD": the model's self-attention as agent attention on merged tokens."""

    DESCRIPTION = (
        "AgentSD (agent attention on ToMe token merging, ECCV 2024): faster sampling of SD 1.x, SD 2.x and "
        "SDXL models with no training. Patches a copy of the model; the model given stays as it is."
    )
    CATEGORY = "model_patches/unet"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with AgentSD on its highest-resolution attention blocks.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        fixed_only = "Used by the 'fixed' schedule only."
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD 1.x, SD 2.x or SDXL model."}),
                "ratio": (
                    "FLOAT",
                    {
                        "default": 0.4,
                        "min": 0.0,
                        "max": 0.99,
                        "step": 0.01,
                        "tooltip": "Fraction of each patched block's tokens merged away before self-attention. "
                        "Higher is faster and further from the unpatched model; 0 merges nothing.",
                    },
                ),
                "schedule": (
                    list(SCHEDULES),
                    {
                        "default": "recipe",
                        "tooltip": "recipe: the paper's two phases, agent attention (agent_ratio 0.95, 4x4 cells) "
                        "for the noisiest 40% of the noise schedule, then plain ToMe (2x2 cells). 'agent phase only' "
                        "and 'ToMe phase only' run one of them on every step; 'fixed' runs one phase from "
                        "agent_ratio, sx and sy. Phases follow the noise level, so they fit every sampler, "
                        "scheduler and denoise.",
                    },
                ),
                "agent_ratio": (
                    "FLOAT",
                    {
                        "default": FIXED_DEFAULTS["agent_ratio"],
                        "min": 0.0,
                        "max": 0.99,
                        "step": 0.01,
                        "tooltip": "Fraction of tokens merged away to make the agent tokens. Agents are used only "
                        "when they are fewer than half the merged tokens; otherwise the phase is plain ToMe. "
                        + fixed_only,
                    },
                ),
                "sx": (
                    "INT",
                    {
                        "default": FIXED_DEFAULTS["sx"],
                        "min": 1,
                        "max": 8,
                        "tooltip": "Width of the cells that each keep one destination token. " + fixed_only,
                    },
                ),
                "sy": (
                    "INT",
                    {
                        "default": FIXED_DEFAULTS["sy"],
                        "min": 1,
                        "max": 8,
                        "tooltip": "Height of the cells that each keep one destination token. " + fixed_only,
                    },
                ),
                "max_downsample": (
                    list(MAX_DOWNSAMPLES),
                    {
                        "default": "auto",
                        "tooltip": "Patch the blocks at most this many times coarser than the latent. auto: the "
                        "highest-resolution attention level (1 on SD 1.x/2.x, 2 on SDXL), where merging saves most.",
                    },
                ),
                "use_rand": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "A random destination in each cell (drawn from seed, the timestep and the block; "
                        "never the sampler's noise) instead of the top-left one.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**63 - 1,
                        "tooltip": "Seed of the destination draw: the same seed gives the same image.",
                    },
                ),
                "fp32_attention": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Compute agent attention in float32 (SD 2.1 overflows in fp16 otherwise).",
                    },
                ),
            }
        }

    def patch(self, model: Any, **inputs: Any) -> tuple[Any]:
        """The patched clone of ``model``; ``inputs`` are the node's other inputs (:func:`node_config`)."""
        return (apply_agentsd(model, node_config(**inputs)),)


NODE_CLASS_MAPPINGS = {"AgentSD": AgentSDNode}
NODE_DISPLAY_NAME_MAPPINGS = {"AgentSD": "AgentSD"}
