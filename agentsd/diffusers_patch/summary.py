"""What the patch changed and what ran: :class:`PatchSummary`.

The configuration says what should run; the summary also says what did. Each patched block notes,
at its last eager call, the phase, the processor its layers called and whether agent attention
stood in for it (agents replace only plain softmax attention: a PAG or recording processor runs as
it is, on merged tokens). For a pipeline whose scheduler has a schedule, it maps the scheduler's
steps to the phases.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..config import AgentSDConfig
from ..schedule import phase_index, phase_spans, step_ranges
from .state import StageRun, UNetState
from .timesteps import NoiseRule


@dataclass(frozen=True)
class PatchedBlock:
    """One transformer block that AgentSD patched, and what it ran at its last eager call.

    Attributes:
        name: Its path in the UNet.
        downsample: Its resolution level (1 = the latent's).
        tokens_seen: Its token count at its last call (``None`` before the first).
        cross_only: Whether its ``attn1`` attends to the text (no self-attention: ToMe in every phase).
        runs: What each merging stage ran (``"attn1"`` etc.), at its last eager call.
        attention: The name of its self- or joint attention stage (``"attn1"``; ``"attn"`` in SD3 and Flux).
        frames_seen: The frames of a video it merged one by one at its last call (1 for images; ``None``
            before the first).
    """

    name: str
    downsample: int
    tokens_seen: int | None
    cross_only: bool = False
    runs: tuple[tuple[str, StageRun], ...] = ()
    attention: str = "attn1"
    frames_seen: int | None = None

    def ran(self, stage: str | None = None) -> StageRun | None:
        """What ``stage`` (by default its attention) ran at its last eager call."""
        return dict(self.runs).get(stage or self.attention)


@dataclass(frozen=True)
class PatchSummary:
    """What :func:`agentsd.apply_patch` changed, and what the patched blocks ran at the last call.

    ``str()`` gives a few lines for a notebook: the blocks, the settings, the scheduler's steps by
    phase, and what the blocks ran at the last call.

    Attributes:
        config: The settings in force.
        max_downsample: The coarsest level patched.
        blocks: The patched blocks, in the order they run.
        total_blocks: The UNet's spatial transformer blocks, patched or not.
        num_train_timesteps: The horizon of the phases' ``min_t``.
        scheduler: Class name of the pipeline's scheduler, or ``None`` for a bare UNet.
        steps: For a pipeline whose scheduler has a schedule: ``(first step, last step, phase index)``
            runs over its steps, else ``()``.
        model: Class name of the patched model.
        family: ``"UNet"``, or the diffusion transformer's family (``"SD3"``, ``"Flux"``, ``"PixArt"``).
        temporal_blocks: The UNet's temporal transformer blocks (tokens = frames), never patched.
    """

    config: AgentSDConfig
    max_downsample: int
    blocks: tuple[PatchedBlock, ...]
    total_blocks: int
    num_train_timesteps: int = 1000
    scheduler: str | None = None
    steps: tuple[tuple[int, int, int], ...] = ()
    model: str = "UNet2DConditionModel"
    family: str = "UNet"
    temporal_blocks: int = 0

    def __str__(self) -> str:
        levels = sorted({block.downsample for block in self.blocks})
        tokens = sorted({block.tokens_seen for block in self.blocks if block.tokens_seen is not None})
        seen = f", {'/'.join(map(str, tokens))} tokens in the last call" if tokens else ""
        if self.family == "UNet":
            where = f"downsample {'/'.join(map(str, levels)) or '-'} <= max_downsample={self.max_downsample}{seen}"
            lines = [f"AgentSD patched {len(self.blocks)} of {self.total_blocks} transformer blocks ({where})"]
        else:
            lines = [
                f"AgentSD patched {len(self.blocks)} of the {self.total_blocks} blocks of {self.model} "
                f"({self.family}: each sees the whole image grid{seen}; text tokens are never merged)"
            ]
        config = self.config
        # A custom schedule ignores config.ratio: each phase line below states its own.
        schedule = f"{config.schedule!r}, ratio {config.ratio:g}" if isinstance(config.schedule, str) else "custom"
        parts = {"merge_attn": "self-attention", "merge_crossattn": "cross-attention", "merge_mlp": "feed-forward"}
        merged = [part for name, part in parts.items() if getattr(config, name)]
        lines.append(
            f"  schedule {schedule}, merging in {', '.join(merged) or 'nothing'}, "
            f"k_scale2 {config.k_scale2:g}, k_shortcut {config.k_shortcut:g}, seed {config.seed}"
        )
        spans = phase_spans(config.phases, self.num_train_timesteps)
        lines += [f"  {span}: {phase.describe()}" for span, phase in zip(spans, config.phases)]
        cross_only = sum(block.cross_only for block in self.blocks)
        if cross_only:
            lines.append(
                f"  {cross_only} of the {len(self.blocks)} blocks have no self-attention (attn1 attends to the "
                "text, only_cross_attention): no agents there, ToMe in every phase"
            )
        lines += self._video()
        if self.steps:
            total = self.steps[-1][1] + 1
            ranges = ", ".join(
                f"{first}-{last} {self._kind(index)}" if first != last else f"{first} {self._kind(index)}"
                for first, last, index in self.steps
            )
            lines.append(f"  {self.scheduler}, {total} steps: {ranges}")
        lines += self._last_call()
        return "\n".join(lines)

    def _video(self) -> list[str]:
        """The ``video:`` line of a video UNet: frames per video in the last call, the temporal blocks left alone."""
        frames = sorted({block.frames_seen for block in self.blocks if block.frames_seen is not None})
        if not self.temporal_blocks and frames in ([], [1]):
            return []
        seen = f"{'/'.join(map(str, frames))} frames per video in the last call, " if frames else ""
        return [
            f"  video: {seen}each frame merged on its own; the {self.temporal_blocks} temporal transformer blocks "
            "(tokens = frames) are not patched"
        ]

    def _kind(self, index: int) -> str:
        return "agent attention" if self.config.phases[index].uses_agents else "ToMe"

    def _last_call(self) -> list[str]:
        """``last call: ...`` lines: per phase that ran, how many blocks ran what."""
        runs = [block.ran() for block in self.blocks if block.ran() is not None]
        if not runs:
            return []
        counts = Counter(
            (run.phase, "agent attention" if run.agents else "ToMe" if run.merged else "unmerged", run.processor)
            for run in runs
        )
        spans = phase_spans(self.config.phases, self.num_train_timesteps)
        return [
            f"  last call ({spans[phase]}): {what} in {count} block{'s' if count > 1 else ''}"
            + ("" if what == "agent attention" else f" through {processor}")
            for (phase, what, processor), count in sorted(counts.items())
        ]


def scheduler_steps(owner: Any, rule: NoiseRule, config: AgentSDConfig) -> tuple[str | None, tuple]:
    """The pipeline's scheduler name and its steps' phase runs (``()`` without a schedule)."""
    scheduler = getattr(owner, "scheduler", None)
    if scheduler is None:
        return None, ()
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return type(scheduler).__name__, ()
    phases = [phase_index(config.phases, rule.scheduler_level(float(t))) for t in timesteps.tolist()]
    return type(scheduler).__name__, tuple(step_ranges(phases))


def summarize(
    state: UNetState,
    max_downsample: int,
    total_blocks: int,
    owner: Any = None,
    model: str = "UNet2DConditionModel",
    temporal_blocks: int = 0,
) -> PatchSummary:
    """The :class:`PatchSummary` of a patched model's state (``owner``: the pipeline, if any; ``model``:
    the patched model's class name)."""
    blocks = tuple(
        PatchedBlock(
            block.name,
            block.downsample,
            block.tokens_seen,
            block.cross_only,
            tuple(sorted(block.runs.items())),
            block.attention,
            block.frames_seen,
        )
        for block in state.blocks
    )
    scheduler, steps = scheduler_steps(owner, state.rule, state.config)
    return PatchSummary(
        config=state.config,
        max_downsample=max_downsample,
        blocks=blocks,
        total_blocks=total_blocks,
        num_train_timesteps=state.num_train_timesteps,
        scheduler=scheduler,
        steps=steps,
        model=model,
        family=state.backbone.family,
        temporal_blocks=temporal_blocks,
    )
