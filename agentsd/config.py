"""AgentSD settings: one phase of token merging, a schedule of phases, and the whole configuration.

The published recipe (Han et al., ECCV 2024) changes its merging settings part-way through
sampling: agent attention with coarse destination cells while the image's layout forms, plain ToMe
with finer cells afterwards. A :class:`Phase` holds the settings of one such span; the schedule is
an ordered tuple of phases, each covering the timesteps from its ``min_t`` up to the previous
phase's. Timesteps (the noise level), not step indices, pick the phase, so the same schedule fits
any number of steps, any scheduler, and image-to-image or inpainting runs that start part-way down
the noise schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from numbers import Integral, Real
from typing import Literal

#: Reference defaults of a single phase (the knobs of the upstream code).
FIXED_DEFAULTS = {"agent_ratio": 0.8, "sx": 2, "sy": 2}

#: The recipe's agent phase covers timesteps t >= RECIPE_SWITCH * num_train_timesteps. With SD 1.5's
#: 50 PLMS steps (t = 981, 961, ..., 1) that is t = 981 ... 601: steps 0-19, as published.
RECIPE_SWITCH = 0.6

ScheduleSpec = Literal["recipe", "fixed"] | Sequence["Phase"]


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _check_stride(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _plain(instance: object, *names: str) -> None:
    """Store the numbers ``names`` of a frozen dataclass as Python ints and floats (NumPy scalars are
    accepted, but a traced call must see plain constants)."""
    for name in names:
        value = getattr(instance, name)
        if isinstance(value, Integral):
            object.__setattr__(instance, name, int(value))
        elif isinstance(value, Real):
            object.__setattr__(instance, name, float(value))


def _block_names(blocks: object) -> tuple[str, ...]:
    names = (blocks,) if isinstance(blocks, str) else blocks
    if not isinstance(names, Sequence) or not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(
            f"blocks must be None, a block name or a non-empty sequence of block names "
            f"(see agentsd.select_blocks), got {blocks!r}"
        )
    return tuple(names)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Phase:
    """Token-merging settings for one span of the denoising trajectory.

    Attributes:
        ratio: Fraction of a block's tokens removed by merging before self-attention
            (``r = int(N * ratio)``). 0 leaves the block untouched.
        agent_ratio: Fraction removed by the second, stronger merge that makes the agent tokens
            (``agent_r = int(N * agent_ratio)``). Agents are used only when they are fewer than
            half the merged tokens, ``(N - agent_r) * 2 < N - r``; otherwise the phase is plain ToMe.
        sx: Width of the destination cells: one destination token per ``sx``-by-``sy`` cell.
            Coarser cells allow more merging and fewer agents.
        sy: Height of the destination cells.
        min_t: The phase covers timesteps ``t`` with ``t / num_train_timesteps >= min_t`` (and
            below the previous phase's ``min_t``). The last phase of a schedule must have 0.
    """

    ratio: float
    agent_ratio: float
    sx: int = 2
    sy: int = 2
    min_t: float = 0.0

    def __post_init__(self) -> None:
        _check_fraction("ratio", self.ratio)
        _check_fraction("agent_ratio", self.agent_ratio)
        _check_stride("sx", self.sx)
        _check_stride("sy", self.sy)
        if isinstance(self.min_t, bool) or not isinstance(self.min_t, Real) or not 0 <= self.min_t <= 1:
            raise ValueError(f"min_t must be a number in [0, 1], got {self.min_t!r}")
        _plain(self, "ratio", "agent_ratio", "sx", "sy", "min_t")

    @property
    def uses_agents(self) -> bool:
        """Whether agents pass the half rule, ``(N - agent_r) * 2 < N - r``, written for fractions
        (never at ratio 0, which merges nothing).

        A block's integer rounding can tip a case that sits exactly on the boundary; the blocks
        decide with their own token counts.
        """
        return self.ratio > 0 and (1 - self.agent_ratio) * 2 < 1 - self.ratio

    def describe(self) -> str:
        """One line: what a patched block does in this phase."""
        if self.ratio == 0:
            return "unmerged (ratio 0)"
        cells = f"sx=sy={self.sx}" if self.sx == self.sy else f"sx={self.sx}, sy={self.sy}"
        kind = f"agent attention (agent_ratio {self.agent_ratio:g})" if self.uses_agents else "ToMe"
        return f"{kind}, ratio {self.ratio:g}, {cells}"


def recipe(ratio: float) -> tuple[Phase, Phase]:
    """The published two-phase schedule at merge ratio ``ratio``.

    Agent phase (sx = sy = 4, agent_ratio 0.95) for the noisiest 40% of the noise schedule, then
    plain ToMe (sx = sy = 2, agent_ratio 0.5, which never passes the half rule).
    """
    return (
        Phase(ratio=ratio, agent_ratio=0.95, sx=4, sy=4, min_t=RECIPE_SWITCH),
        Phase(ratio=ratio, agent_ratio=0.5, sx=2, sy=2, min_t=0.0),
    )


@dataclass(frozen=True)
class AgentSDConfig:
    """Everything :func:`agentsd.apply_patch` needs; validated on construction.

    Attributes:
        ratio: Fraction of tokens merged away in every phase, in [0, 1).
        schedule: ``"recipe"`` (default) for the published two phases at ``ratio``; ``"fixed"`` for
            one phase over all steps built from ``ratio``, ``agent_ratio``, ``sx`` and ``sy``; or a
            sequence of :class:`Phase` (from noisiest to cleanest, ``min_t`` strictly decreasing,
            the last 0), in which case ``ratio`` is ignored in favour of each phase's own.
        agent_ratio: Only with ``schedule="fixed"`` (default 0.8).
        sx: Only with ``schedule="fixed"`` (default 2).
        sy: Only with ``schedule="fixed"`` (default 2).
        max_downsample: Patch transformer blocks whose feature map is at most this many times
            coarser than the latent. ``None`` picks the model's highest-resolution attention level
            (1 on SD 1.x/2.x, 2 on SDXL, which has no attention at full latent resolution; every
            block of a diffusion transformer, whose blocks all see the whole patch grid).
        blocks: Patch only the blocks of these names, or name prefixes (``"transformer_blocks.3"``,
            ``"single_transformer_blocks"``), among those ``max_downsample`` selects; a string is
            one name. ``None`` patches them all. :func:`agentsd.select_blocks` lists the names.
        k_scale2: Exponent of the agent-to-query softmax scale: ``(head_dim ** -0.5) ** k_scale2``.
        k_shortcut: Weight of the value shortcut added to the agent-attention output.
        attn_precision: ``None`` computes attention in the model's dtype; ``"fp32"`` computes the
            two agent-attention products in float32 (SD 2.1 overflows in fp16 otherwise).
        use_rand: Pick a random destination in each cell (a hash of ``seed``, the timestep and the
            block, computed on the device; never the global RNG) instead of the top-left one.
            Forced off for odd batch sizes, so that the prompted and unprompted halves of a
            guidance batch always share a merge plan.
        merge_attn: Merge tokens (and use agents) in self-attention.
        merge_crossattn: Also merge tokens before cross-attention (plain ToMe, never agents).
        merge_mlp: Also merge tokens before the feed-forward (plain ToMe, never agents).
        seed: Seed of the destination choice. The draw depends only on ``seed``, the timestep and
            the block, so a generation is reproducible whatever ran before it, eager or compiled.
        num_train_timesteps: The scheduler's training horizon that ``Phase.min_t`` is relative to.
            ``None`` reads it from the pipeline's scheduler, or uses 1000 for a bare UNet.
    """

    ratio: float = 0.4
    schedule: ScheduleSpec = "recipe"
    agent_ratio: float | None = None
    sx: int | None = None
    sy: int | None = None
    max_downsample: int | None = None
    blocks: str | Sequence[str] | None = None
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    attn_precision: Literal["fp32"] | None = None
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0
    num_train_timesteps: int | None = None
    phases: tuple[Phase, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_fraction("ratio", self.ratio)
        if self.max_downsample is not None:
            _check_stride("max_downsample", self.max_downsample)
        if self.blocks is not None:
            object.__setattr__(self, "blocks", _block_names(self.blocks))
        for name in ("k_scale2", "k_shortcut"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.attn_precision not in (None, "fp32"):
            raise ValueError(f"attn_precision must be None or 'fp32', got {self.attn_precision!r}")
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            _check_bool(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        if self.num_train_timesteps is not None:
            _check_stride("num_train_timesteps", self.num_train_timesteps)
        for name, check in (("agent_ratio", _check_fraction), ("sx", _check_stride), ("sy", _check_stride)):
            if getattr(self, name) is not None:
                check(name, getattr(self, name))
        _plain(self, "ratio", "agent_ratio", "sx", "sy", "max_downsample", "k_scale2", "k_shortcut", "seed")
        _plain(self, "num_train_timesteps")
        object.__setattr__(self, "phases", self._resolve_phases())

    def _resolve_phases(self) -> tuple[Phase, ...]:
        fixed_knobs = {"agent_ratio": self.agent_ratio, "sx": self.sx, "sy": self.sy}
        given = [name for name, value in fixed_knobs.items() if value is not None]
        if self.schedule == "fixed":
            knobs = {name: FIXED_DEFAULTS[name] if value is None else value for name, value in fixed_knobs.items()}
            return (Phase(ratio=self.ratio, **knobs),)
        if given:
            names = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(
                f"{names} only {verb} with schedule='fixed' (one phase for all steps); "
                f"schedule={self.schedule!r} sets {'it' if len(given) == 1 else 'them'} itself"
            )
        if self.schedule == "recipe":
            return recipe(self.ratio)
        if isinstance(self.schedule, str) or not isinstance(self.schedule, Sequence) or not self.schedule:
            raise ValueError(
                f"schedule must be 'recipe', 'fixed' or a non-empty sequence of agentsd.Phase, got {self.schedule!r}"
            )
        phases = tuple(self.schedule)
        if not all(isinstance(phase, Phase) for phase in phases):
            raise TypeError(f"schedule must contain only agentsd.Phase objects, got {self.schedule!r}")
        starts = [phase.min_t for phase in phases]
        if any(a <= b for a, b in pairwise(starts)) or starts[-1] != 0:
            raise ValueError(
                f"schedule phases must run from noisiest to cleanest: min_t strictly decreasing and the last 0, "
                f"got min_t = {starts}"
            )
        return phases

    def phase_at(self, timestep: float, num_train_timesteps: int) -> Phase:
        """The phase that covers ``timestep`` (in the scheduler's units, 0 ... num_train_timesteps)."""
        noise_level = timestep / num_train_timesteps
        for phase in self.phases:
            if noise_level >= phase.min_t:
                return phase
        return self.phases[-1]
