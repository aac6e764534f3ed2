"""What a patched UNet and each of its patched blocks know about the current call.

A UNet call starts by noting its latent size, timestep and random keys (:class:`UNetState`). Eager,
it also picks the phase on the host and draws every block's grid layout, so that a block only has
to plan its merges from its input (:class:`BlockState`). Traced in one graph, nothing is read on the
host: each merging stage plans inside a ``torch.cond`` on the noise level
(:func:`agentsd.block.stage_by_noise_level`).

Layouts and the phase stay on the state until the next call: gradient checkpointing runs a
block's forward again during the backward pass, after the call has returned, and it must merge the
same tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import astuple, dataclass, field
from typing import Any

import torch

from .. import block as block_runner
from ..config import AgentSDConfig, Phase
from ..layout import GridLayout, draw_keys
from ..merge import MergePlan, make_layout, make_plan, merges_any
from ..schedule import phase_index
from .backbones import BACKBONES, Backbone, IdsGrid
from .joint_layers import JointCall
from .layers import StageCall
from .timesteps import HostTimesteps, NoiseRule

logger = logging.getLogger("agentsd")


@dataclass
class UNetState:
    """What every patched block of one model (a UNet or a diffusion transformer) needs to know about the current call.

    Attributes:
        config: The settings in force.
        rule: How the call's timestep becomes its noise level.
        backbone: How the model is called.
        blocks: The patched blocks, in the order they run.
        latent_size: (H, W) of this call's finest token grid (a UNet's or patchified transformer's
            latent; Flux's token grid).
        batch_size: The first dimension of this call's ``sample``: images, or videos (whose frames the
            spatial blocks see as batch entries).
        timestep: This call's timestep, a 0-d float32 tensor on the model's device.
        phase: The phase of this call when it is known on the host (eager calls, ``compile_unet``),
            else ``None`` (traced calls: the blocks choose on the device).
        whole_graph: Whether this call's blocks are traced in one graph with the UNet's call.
        keys: This call's random keys, one per patched block, or ``None`` for fixed destinations
            (``config.use_rand`` off, or an odd batch).
        host_timesteps: Where eager calls read the timestep's value without a device sync.
        ids_grid: Where Flux's token grid is read from its ``img_ids``.
    """

    config: AgentSDConfig
    rule: NoiseRule
    backbone: Backbone = BACKBONES["UNet"]
    blocks: list[BlockState] = field(default_factory=list)
    latent_size: tuple[int, int] = (0, 0)
    batch_size: int = 0
    timestep: torch.Tensor | None = None
    phase: Phase | None = None
    whole_graph: bool = False
    keys: torch.Tensor | None = None
    host_timesteps: HostTimesteps = field(default_factory=HostTimesteps)
    ids_grid: IdsGrid = field(default_factory=IdsGrid)

    @property
    def num_train_timesteps(self) -> int:
        return self.rule.num_train_timesteps

    def start_call(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, latent_size: tuple[int, int] | None = None
    ) -> None:
        """Note this call's latent size and timestep; pick the phase on the host unless traced."""
        self.choose_phase(timestep)
        self.start_on_device(sample, timestep, latent_size)

    def choose_phase(self, timestep: torch.Tensor | float) -> None:
        """The phase of this call, from a host copy of the schedule (no read per call); ``None`` when
        traced, where nothing is read and the blocks choose on the device."""
        if torch.compiler.is_compiling():
            self.phase = None
            return
        value = self.host_timesteps.first_value(timestep)
        level = self.rule.level(value)
        index = phase_index(self.config.phases, level)
        self.phase = self.config.phases[index]
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "agentsd: timestep %g, noise level %.3f: phase %d, %s", value, level, index, self.phase.describe()
            )

    def start_on_device(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, latent_size: tuple[int, int] | None = None
    ) -> None:
        """This call's timestep tensor, latent size (``sample``'s last two sides unless given) and random
        keys; the blocks' layouts if the phase is known."""
        self.whole_graph = torch.compiler.is_compiling()
        first = (timestep if torch.is_tensor(timestep) else torch.tensor(float(timestep))).flatten()[0]
        self.timestep = first.to(device=sample.device, dtype=torch.float32)
        self.latent_size = latent_size or (sample.shape[-2], sample.shape[-1])
        self.batch_size = sample.shape[0]
        # Odd batches of a guided model cannot hold whole (prompted, unprompted) pairs: random
        # destinations would give the two halves of a pair different plans, so use the fixed top-left ones.
        # A video's sample ([videos, frames, ...] or [videos, channels, frames, ...]) counts videos here:
        # the guided pair of one video is 2 of them, whatever its frames. Every frame of the call gets
        # the same layout, so frame f of both halves shares its destinations.
        use_rand = self.config.use_rand and (sample.shape[0] % 2 == 0 or not self.backbone.guidance_batch)
        self.keys = draw_keys(self.config.seed, self.timestep, len(self.blocks)) if use_rand else None
        if self.phase is not None and not self.whole_graph:
            self.draw_layouts(self.phase)

    def end_call(self) -> None:
        """Drop this call's tensors: compiled, a tensor left on the state would be one more graph output."""
        self.timestep = self.keys = None

    def draw_layouts(self, phase: Phase) -> None:
        """Give every block its layout in ``phase``, drawn here, outside the blocks, so that a
        regionally compiled block sees only tensors and values that are the same for every block of
        its level.

        Blocks that run one after another at one level share a grid: their layouts are drawn together,
        by one set of ops (each op is host time on a GPU in eager mode), from their slice of the keys.
        Fixed layouts are drawn once per grid.
        """
        device = self.timestep.device
        fixed: dict[tuple[int, int], GridLayout | None] = {}
        for run in _runs_at_one_level(self.blocks):
            first = run[0]
            grid = first.grid()
            layouts: list[GridLayout | None]
            if self.keys is None:
                if grid not in fixed:
                    fixed[grid] = make_layout(grid, phase, None, device)
                layouts = [fixed[grid]] * len(run)
            elif merges_any(grid, phase):
                keys = self.keys[first.index : first.index + len(run)]
                layouts = GridLayout.draw_each(*grid, phase.sx, phase.sy, keys)
            else:
                layouts = [None] * len(run)
            for block, layout in zip(run, layouts):
                block.layout = layout


def _runs_at_one_level(blocks: list[BlockState]) -> list[list[BlockState]]:
    """``blocks`` (in the order they run) cut into runs of consecutive blocks at one level."""
    runs: list[list[BlockState]] = []
    for block in blocks:
        if runs and runs[-1][-1].downsample == block.downsample:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


@dataclass(frozen=True)
class StageRun:
    """What one stage of a block did at its last eager call, for the summary.

    Attributes:
        phase: Index of the phase in the schedule.
        processor: Class name of the processor (attention) or module (feed-forward) that ran.
        merged: Whether it ran on merged tokens.
        agents: Whether agent attention stood in for the processor.
    """

    phase: int
    processor: str
    merged: bool
    agents: bool


@dataclass(eq=False)
class BlockState:
    """One patched transformer block: where it sits, and its merge plan for the current call.

    Attributes:
        unet: The UNet's per-call state.
        index: Position among the patched blocks (part of the random key of its destinations).
        downsample: Its resolution level (1 = the latent's).
        name: Its path in the UNet.
        last_stage: The last of its stages that merges (by attribute name); that stage drops the plan.
        attention: The name of its self- or joint attention stage (what the summary reports first).
        metric: This call's block input, the similarity metric (until the block returns).
        layout: The grid layout of the last eager call.
        plan: This call's merge plan, when the phase is known on the host.
        cross_only: Whether its ``attn1`` attends to the text (``only_cross_attention``, as in the x4
            upscaler): it has no self-attention, so no agents, and runs ToMe in every phase.
        tokens_seen: Its token count at its last call.
        frames_seen: Batch entries per entry of the model's ``sample`` at its last call: the frames of a
            video (each merged on its own), 1 for images.
        runs: What each of its stages did at its last eager call.
    """

    unet: UNetState
    index: int
    downsample: int
    name: str = ""
    last_stage: str = "attn1"
    attention: str = "attn1"
    cross_only: bool = False
    metric: torch.Tensor | None = None
    layout: GridLayout | None = None
    plan: MergePlan | None = None
    tokens_seen: int | None = None
    frames_seen: int | None = None
    runs: dict[str, StageRun] = field(default_factory=dict)

    @property
    def config(self) -> AgentSDConfig:
        return self.unet.config

    def grid(self) -> tuple[int, int]:
        """(h, w) of this block's token grid in the current call."""
        h, w = (math.ceil(side / self.downsample) for side in self.unet.latent_size)
        return h, w

    def random_key(self) -> torch.Tensor | None:
        """The key of this block's random destinations in the current call, or ``None`` for fixed ones."""
        return self.unet.keys[self.index] if self.unet.keys is not None else None

    def start(self, x: torch.Tensor) -> None:
        """The block is called with input ``x``: plan now if the phase is known (outside a whole-model
        graph), else keep the metric."""
        self.tokens_seen = x.shape[1]
        self.frames_seen = x.shape[0] // max(self.unet.batch_size, 1)
        if self.unet.phase is not None and not self.unet.whole_graph:
            self.plan = make_plan(self.unet.phase, self.layout, x)
        else:
            self.metric = x

    def finish(self) -> None:
        """Forget this call's plan and metric: their tensors stay out of later memory peaks."""
        self.plan = self.metric = None

    def run(self, call: StageCall | JointCall, x: torch.Tensor) -> Any:
        """``call``'s output for tokens ``x``, on this call's merged tokens.

        Eager (and regionally compiled), the plan was made when the block started; the block's last
        merging stage drops it, so its index tensors stay out of the feed-forward's memory peak.
        Traced in one graph, the stage plans from the block input in a compile region shared by the
        blocks of a level: for the phase chosen on the host (``compile_unet``: one graph per phase),
        or for every phase, the noise level picking one on the device.
        """
        unet = self.unet
        if not unet.whole_graph:
            plan = self.plan
            if call.stage == self.last_stage:
                self.plan = None
            if not torch.compiler.is_compiling():
                self.record(call, plan, x)
            return call.output(plan, x)
        phases = tuple(astuple(phase) for phase in (self.config.phases if unet.phase is None else (unet.phase,)))
        level = unet.rule.level_on_device(unet.timestep)
        # A block built unlike the others of its level (SD3's last, whose attention has no text output)
        # cannot share their compile region: it is traced on its own.
        if getattr(call.module, "context_pre_only", False):
            traced_stage = block_runner.stage_by_noise_level
        else:
            traced_stage = block_runner.traced_stage(len(phases), x.is_cuda)
        return traced_stage(call, x, self.metric, self.random_key(), level, self.grid(), phases)

    def record(self, call: StageCall | JointCall, plan: MergePlan | None, x: torch.Tensor) -> None:
        """Note what ``call`` runs (for :func:`agentsd.patch_summary`)."""
        merged = call.fits(plan, x)
        self.runs[call.stage] = StageRun(
            phase=self.config.phases.index(self.unet.phase),
            processor=call.runner_name(merged),
            merged=merged,
            agents=merged and call.agents is not None and plan.agents is not None,
        )
