"""Patching a diffusers UNet with AgentSD, and removing the patch.

Diffusers' hook registry carries the whole method, with no class rewriting and no processor
replaced:

* a hook on the UNet (:class:`UNetHook`) takes the latent size from ``sample`` and the timestep
  tensor from ``timestep`` (positional or keyword) at every call;
* a hook on each patched ``BasicTransformerBlock`` (:class:`BlockHook`) keeps the block's input,
  which is the similarity metric of the merge;
* ``attn1`` (and ``attn2`` with ``merge_crossattn``, ``ff`` with ``merge_mlp``) get a ``forward``
  that runs the layer on the merged tokens and unmerges its output (:class:`MergedStage`).

The timestep's value picks the schedule's phase. Eager, it is looked up on the host, in a copy of the
scheduler's timesteps made once per schedule (:class:`HostTimesteps`: no device sync per call), and the
blocks run the chosen phase. Traced (``torch.compile(unet, fullgraph=True)``, ``torch.export``), nothing
is read: every merging stage holds all the phases as branches of a ``torch.cond`` on the timestep
tensor, so one graph serves a whole generation, with no break, no recompilation and no host read; and it
is a compile region, traced once for all the blocks of a level (:func:`_stage_by_noise_level`).
:func:`compile_unet` compiles the other way, for CUDA graphs, which no graph with a ``torch.cond`` gets:
the hook picks the phase on the host, outside the compiled code, and each phase is a graph of its own.
The random destinations are hashed from (seed, timestep, block) on the device
(:func:`agentsd.merge.draw_keys`) in both cases, so eager and traced calls plan alike.

The UNet hook is the registry of everything that was changed: it keeps the hooks and forwards it added, so
:func:`remove_patch` restores the model exactly. Since no processor is replaced,
``unet.attn_processors``, ``set_attn_processor``, ``state_dict`` and ``save_attn_procs`` see the
user's processors, with their weights, while the patch is on.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import BasicTransformerBlock

from .attention import AgentSettings, attend_merged, processor_kwargs
from .config import AgentSDConfig, Phase
from .diffusers_patch.blocks import find_unet as _find_unet
from .diffusers_patch.blocks import transformer_blocks, unsupported_blocks
from .layout import GridLayout, draw_keys
from .merge import MergePlan, make_layout, make_plan, merges_any

logger = logging.getLogger("agentsd")

#: The parts of a transformer block that can run on merged tokens, in the order they run.
Stage = Literal["attn1", "attn2", "ff"]

HOOK_NAME = "agentsd"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000

#: Storages of more elements than this are not copied to the host whole (a timestep read from a large
#: buffer costs one read per call instead).
MAX_HOST_COPY = 1 << 16


@dataclass(eq=False)
class HostTimesteps:
    """Gives a call's timestep value on the host without making the host wait for the device each call.

    A pipeline passes views of its scheduler's ``timesteps`` tensor, which lives on the model's
    device: reading the element of each call would sync once per UNet call. Instead the whole
    storage behind the view is copied to the host once and each later view of it is read there, at
    its offset: one read per schedule, none per call. The copy is keyed by the storage itself, held
    so that its memory cannot be handed to another tensor, and by the version counter that every
    in-place write bumps, so a rewritten or new schedule is read afresh. Tensors without a version
    counter (made under ``torch.inference_mode``), tensor subclasses and views of large buffers are
    read directly: one read per call, as a plain ``float(timestep)``.

    Attributes:
        storage: The storage copied to the host, or ``None``.
        dtype: The element type its copy was read as.
        version: Its version counter when copied.
        values: Its elements, on the host.
    """

    storage: torch.UntypedStorage | None = None
    dtype: torch.dtype | None = None
    version: int = -1
    values: list[float] = field(default_factory=list)

    def first_value(self, timestep: torch.Tensor | float) -> float:
        """The value of ``timestep``'s first element (a Python number is returned as is)."""
        if not torch.is_tensor(timestep):
            return float(timestep)
        if type(timestep) is not torch.Tensor or timestep.is_inference():  # subclasses: storage may not be theirs
            return float(timestep.flatten()[0])
        storage = timestep.untyped_storage()
        if storage.nbytes() // timestep.element_size() > MAX_HOST_COPY:
            return float(timestep.flatten()[0])
        if not self._holds(storage, timestep):
            self.copy(storage, timestep)
        # A view's first element sits at its storage offset, whatever its shape and strides.
        return float(self.values[timestep.storage_offset()])

    def _holds(self, storage: torch.UntypedStorage, timestep: torch.Tensor) -> bool:
        return (
            self.storage is not None
            and storage.data_ptr() == self.storage.data_ptr()
            and storage.device == self.storage.device
            and storage.nbytes() == self.storage.nbytes()
            and timestep.dtype == self.dtype
            and timestep._version == self.version
        )

    def copy(self, storage: torch.UntypedStorage, timestep: torch.Tensor) -> None:
        """Copy ``storage``, the one behind ``timestep``, to the host: the one read of a schedule."""
        whole = timestep.new_empty(0).set_(storage)  # the whole storage, as timestep's dtype
        self.storage, self.dtype, self.version = storage, timestep.dtype, timestep._version
        self.values = whole.tolist()


@dataclass
class UNetState:
    """What every patched block of one UNet needs to know about the current call.

    Attributes:
        config: The settings in force.
        num_train_timesteps: The horizon ``Phase.min_t`` is relative to.
        blocks: The patched blocks, in the order they run.
        latent_size: (H, W) of this call's ``sample``.
        timestep: This call's timestep, a 0-d float32 tensor on the model's device.
        phase: The phase of this call when it is known on the host (eager calls, :func:`compile_unet`),
            else ``None`` (traced calls: the blocks choose on the device).
        whole_graph: Whether this call's blocks are traced in one graph with the UNet's call
            (``torch.compile(unet)``, ``torch.export``, :func:`compile_unet`): each merging stage then
            plans inside a compile region, not when its block starts (see :meth:`BlockState.run`).
        keys: This call's random keys, one per patched block, or ``None`` when it draws the fixed
            destinations (``config.use_rand`` off, or an odd batch).
        host_timesteps: Where eager calls look up the timestep's value without a device sync.
    """

    config: AgentSDConfig
    num_train_timesteps: int
    blocks: list[BlockState] = field(default_factory=list)
    latent_size: tuple[int, int] = (0, 0)
    timestep: torch.Tensor | None = None
    phase: Phase | None = None
    whole_graph: bool = False
    keys: torch.Tensor | None = None
    host_timesteps: HostTimesteps = field(default_factory=HostTimesteps)

    def start_call(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> None:
        """Note this call's latent size and timestep; pick the phase on the host unless traced."""
        self.choose_phase(timestep)
        self.start_on_device(sample, timestep)

    def choose_phase(self, timestep: torch.Tensor | float) -> None:
        """The phase of this call, from a host copy of the schedule (no read per call); ``None`` when
        traced, where nothing is read and the blocks choose on the device (see BlockState.run)."""
        if torch.compiler.is_compiling():
            self.phase = None
        else:
            self.phase = self.config.phase_at(self.host_timesteps.first_value(timestep), self.num_train_timesteps)

    def start_on_device(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> None:
        """This call's timestep tensor, latent size and random keys; the blocks' layouts if the phase is known.

        Eager, knowing the phase on the host saves every block from carrying all the phases. Traced in
        one graph, each stage draws its own layout (see :meth:`BlockState.run`).
        """
        self.whole_graph = torch.compiler.is_compiling()
        first = (timestep if torch.is_tensor(timestep) else torch.tensor(float(timestep))).flatten()[0]
        self.timestep = first.to(device=sample.device, dtype=torch.float32)
        self.latent_size = (sample.shape[-2], sample.shape[-1])
        # Odd batches cannot hold whole (prompted, unprompted) pairs: random destinations would give
        # the two halves of a pair different plans, so use the fixed top-left ones.
        use_rand = self.config.use_rand and sample.shape[0] % 2 == 0
        self.keys = draw_keys(self.config.seed, self.timestep, len(self.blocks)) if use_rand else None
        if self.phase is not None and not self.whole_graph:
            self.draw_layouts(self.phase)

    def end_call(self) -> None:
        """Drop this call's tensors: compiled, a tensor left on the state would be one more graph output."""
        self.timestep = self.keys = None
        for block in self.blocks:
            block.layout = None

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


try:  # registers torch.ops.prims.inductor_force_stride_order, private to inductor but with an eager kernel
    import torch._inductor.inductor_prims  # noqa: F401

    _FORCE_STRIDE = torch.ops.prims.inductor_force_stride_order.default
except (ImportError, AttributeError):  # pragma: no cover - a torch without it
    _FORCE_STRIDE = None


def _cond_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous operand of ``torch.cond``, in a layout inductor must keep.

    Inductor (torch 2.13) compiles a cond's branches for the strides its operands were traced with,
    but may lay an operand out otherwise (even a ``.contiguous()`` copy: the block input arrives
    channel-strided from ``Transformer2DModel``), and the branch then fails its stride check at run
    time. Forcing the stride pins the layout; outside inductor it is ``t.contiguous()``.
    """
    t = t.contiguous()
    return t if _FORCE_STRIDE is None else _FORCE_STRIDE(t, t.stride())


def _by_noise_level(
    level: torch.Tensor, phases: Sequence[Phase], branches: Sequence[Callable[..., torch.Tensor]], operands: tuple
) -> torch.Tensor:
    """``branches[i](*operands)`` for the first phase whose ``min_t`` ``level`` reaches, chosen on the device.

    A chain of ``torch.cond``: every branch is in the graph, the predicate stays a tensor.
    """
    if len(phases) == 1:
        return branches[0](*operands)

    def later(*ops: torch.Tensor) -> torch.Tensor:
        return _by_noise_level(level, phases[1:], branches[1:], ops)

    return torch.cond(level >= phases[0].min_t, branches[0], later, operands)


@dataclass(eq=False)
class BlockState:
    """One patched transformer block: where it sits, and its merge plan for the current call.

    Attributes:
        unet: The UNet's per-call state.
        index: Position among the patched blocks (part of the random key of its destinations).
        downsample: Its resolution level (1 = the latent's).
        name: Its path in the UNet, for the summary.
        last_stage: The last of its stages that merges; that stage drops the plan.
        metric: This call's block input, the similarity metric (until the block returns).
        layout: This call's grid layout, when the phase is known on the host.
        plan: This call's merge plan, when the phase is known on the host.
        tokens_seen: Its token count in the last call.
    """

    unet: UNetState
    index: int
    downsample: int
    name: str = ""
    last_stage: Stage = "attn1"
    metric: torch.Tensor | None = None
    layout: GridLayout | None = None
    plan: MergePlan | None = None
    tokens_seen: int | None = None

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
        if self.unet.phase is not None and not self.unet.whole_graph:
            self.plan = make_plan(self.unet.phase, self.layout, x)
        else:
            self.metric = x

    def finish(self) -> None:
        """Forget this call's plan and metric: their tensors stay out of later memory peaks."""
        self.plan = self.metric = None

    def run(self, call: StageCall, x: torch.Tensor) -> torch.Tensor:
        """``call``'s output for tokens ``x``, on this call's merged tokens.

        Eager (and regionally compiled), the plan was made when the block started; the block's last
        merging stage drops it, so its index tensors stay out of the feed-forward's memory peak.
        Traced in one graph, the stage plans from the block input in a compile region shared by the
        blocks of a level (:func:`_stage_by_noise_level`): for the phase chosen on the host
        (:func:`compile_unet`: one graph per phase), or for every phase, the timestep picking one on
        the device.
        """
        unet = self.unet
        if not unet.whole_graph:
            plan = self.plan
            if call.stage == self.last_stage:
                self.plan = None
            return call.output(plan, x)
        phases = tuple(astuple(phase) for phase in (self.config.phases if unet.phase is None else (unet.phase,)))
        level = unet.timestep / unet.num_train_timesteps
        # On CUDA a torch.cond stays at the top of the graph, where inductor sees it and runs the
        # graph without CUDA graphs (mode="reduce-overhead"; compile_unet avoids the conds): inside a
        # region it might capture the cond, and the host read of its predicate, in a CUDA graph.
        # One phase has no cond, and its regions are what CUDA graphs capture.
        in_region = len(phases) == 1 or not x.is_cuda
        traced_stage = _stage_in_region if in_region else _stage_by_noise_level
        return traced_stage(call, x, self.metric, self.random_key(), level, self.grid(), phases)


class StageCall(NamedTuple):
    """One call of a merging stage: the module, which stage it is, and how its own forward is called.

    Plain values (a module, strings, tuples, tensors, ``None``), not a closure, so that a traced call
    can be an argument of :data:`_stage_in_region`, which dynamo traces once for the blocks of a level.
    (A module whose ``forward`` another library had replaced carries that function in ``previous``,
    which dynamo cannot match between blocks: its blocks are then traced one by one, as before.)

    Attributes:
        module: The attention layer or feed-forward.
        stage: Which part of the block it is.
        previous: The module's instance ``forward`` from before the patch (another library's), or ``None``.
        args: Positional arguments of the module's forward besides the tokens.
        kwargs: Its keyword arguments; for an attention layer, those its processor accepts.
        agents: Agent attention's settings where the call may use agents (plain self-attention in
            ``attn1``), else ``None``.
    """

    module: torch.nn.Module
    stage: Stage
    previous: Callable[..., Any] | None
    args: tuple
    kwargs: dict[str, Any]
    agents: AgentSettings | None

    def layer(self, x: torch.Tensor) -> torch.Tensor:
        """The module's own forward on tokens ``x``: its processor for an attention layer, as
        ``Attention.forward`` calls it."""
        if self.previous is not None:
            return self.previous(x, *self.args, **self.kwargs)
        if self.stage == "ff":
            return type(self.module).forward(self.module, x, *self.args, **self.kwargs)
        return self.module.processor(self.module, x, *self.args, **self.kwargs)

    def output(self, plan: MergePlan | None, x: torch.Tensor) -> torch.Tensor:
        """The module's output for tokens ``x`` [B, N, C], computed on ``plan``'s merged tokens.

        Without a plan, or for a call whose token count does not fit it (a feed-forward chunked along
        the tokens by ``set_chunk_feed_forward(dim=1)``), the module runs on ``x`` itself.
        """
        if plan is None or x.shape[1] != plan.num_tokens:
            return self.layer(x)
        if self.stage == "ff":
            return plan.unmerge(self.layer(plan.merge(x)))
        return attend_merged(self.module, x, plan, self.layer, self.agents)


def _stage_by_noise_level(
    call: StageCall,
    x: torch.Tensor,
    metric: torch.Tensor,
    key: torch.Tensor | None,
    level: torch.Tensor,
    grid: tuple[int, int],
    phases: tuple[tuple, ...],
) -> torch.Tensor:
    """A traced stage call: each phase (``phases``: the fields of each :class:`Phase`) is a branch of a
    ``torch.cond`` on the noise level ``level`` that plans from the block input ``metric`` and runs
    ``call`` on the merged ``x``. All branches return [B, N, C], so the graph is the same at every step.

    Its arguments are plain values so that it can be a compile region (:data:`_stage_in_region`).
    """
    chosen = [Phase(*fields) for fields in phases]
    operands = (_cond_operand(x), _cond_operand(metric)) + (() if key is None else (key,))

    def branch(phase: Phase) -> Callable[..., torch.Tensor]:
        def run_phase(x: torch.Tensor, metric: torch.Tensor, *key_operand: torch.Tensor) -> torch.Tensor:
            layout = make_layout(grid, phase, key_operand[0] if key_operand else None, x.device)
            return call.output(make_plan(phase, layout, metric), x)

        return run_phase

    return _by_noise_level(level, chosen, [branch(phase) for phase in chosen], operands)


#: :func:`_stage_by_noise_level` as a compile region: dynamo traces it for the first block of a level and
#: stamps it out for the others, each with its own module and key (an operand, so that the code is the
#: same for every block: see :func:`~agentsd.merge.draw_keys`). Inductor then lowers and generates the
#: branches once per level instead of once per block, which was most of a patched UNet's compile time.
#: torch < 2.8 has no compile regions: there every block traces its own (the same graph, compiled slower).
_stage_in_region = getattr(torch.compiler, "nested_compile_region", lambda fn: fn)(_stage_by_noise_level)


def _call_argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs[name]


class UNetHook(ModelHook):
    """Starts and ends each UNet call; owns everything the patch changed.

    Attributes:
        state: The UNet's per-call state.
        max_downsample: The deepest level patched.
        total_blocks: The UNet's transformer blocks, patched or not.
        hooked_modules: Every module that got a hook, to remove them.
        stages: Every module whose ``forward`` was replaced, to put them back.
        compiled: The UNet's forward compiled by :func:`compile_unet` (phase chosen before it), or ``None``.
    """

    def __init__(self, state: UNetState, max_downsample: int, total_blocks: int) -> None:
        super().__init__()
        self.state = state
        self.max_downsample = max_downsample
        self.total_blocks = total_blocks
        self.hooked_modules: list[HookedModule] = []
        self.stages: list[MergedStage] = []
        self.compiled: Callable[..., Any] | None = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        timestep = _call_argument(args, kwargs, 1, "timestep")
        if self.compiled is None:
            self.state.start_call(_call_argument(args, kwargs, 0, "sample"), timestep)
        else:  # the rest of the start is in the compiled graph
            self.state.choose_phase(timestep)
        return args, kwargs

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            return self.compiled(*args, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.state.end_call()
        return output

    def phase_forward(self, *args: Any, **kwargs: Any) -> Any:
        """What :func:`compile_unet` compiles: the call's device work and the UNet's own forward, for the
        phase the hook chose on the host (dynamo guards on it: a graph per phase)."""
        sample, timestep = _call_argument(args, kwargs, 0, "sample"), _call_argument(args, kwargs, 1, "timestep")
        self.state.start_on_device(sample, timestep)
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.state.end_call()
        return output


class BlockHook(ModelHook):
    """Hands the block's input to its state, and clears the state once the block has run."""

    def __init__(self, state: BlockState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.state.start(_call_argument(args, kwargs, 0, "hidden_states"))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.state.finish()
        return output


@dataclass(eq=False)
class MergedStage:
    """One part of a patched block (``attn1``, ``attn2`` or ``ff``) that runs on the block's merged tokens.

    :meth:`install` replaces the module's ``forward`` with a closure that describes the call
    (:class:`StageCall`) and hands it to the block: merge, run the module's own forward (for ``attn1``
    with agents, :func:`~agentsd.attention.attend_merged` computes agent attention with the layer's
    projections), unmerge.

    A plain closure, not a diffusers hook: the hook registry installs a ``functools.partial`` per
    module, which dynamo guards by identity, so every block of a regionally compiled UNet would be
    compiled anew; a function is guarded by its code, and one graph serves all the blocks of a level.

    Attributes:
        module: The attention layer or feed-forward.
        state: Its block's state.
        stage: Which part of the block it is.
        previous: The instance ``forward`` the module had before (``None``: its class's).
        installed: The ``forward`` put in place, to recognise it at removal.
    """

    module: torch.nn.Module
    state: BlockState
    stage: Stage
    previous: Callable[..., Any] | None = None
    installed: Callable[..., Any] | None = None

    def install(self) -> None:
        module, state, stage = self.module, self.state, self.stage
        previous = module.__dict__.get("forward")

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if stage != "ff" and previous is None:
                call_kwargs, plain_self_attention = processor_kwargs(module, args, kwargs)
                agents = AgentSettings.of(state.config) if stage == "attn1" and plain_self_attention else None
                call = StageCall(module, stage, None, (), call_kwargs, agents)
            else:
                call = StageCall(module, stage, previous, args, kwargs, None)
            return state.run(call, hidden_states)

        self.previous, self.installed = previous, forward
        module.forward = forward

    def remove(self) -> None:
        """Put the module's ``forward`` back; past a wrapper that accelerate added on top, if any."""
        module = self.module
        if module.__dict__.get("_old_forward") is self.installed:
            module._old_forward = self.previous if self.previous is not None else type(module).forward.__get__(module)
        elif module.__dict__.get("forward") is self.installed:
            if self.previous is None:
                del module.forward
            else:
                module.forward = self.previous


@dataclass(frozen=True)
class PatchedBlock:
    """One transformer block that AgentSD patched."""

    name: str
    downsample: int
    tokens_seen: int | None


@dataclass(frozen=True)
class PatchSummary:
    """What :func:`apply_patch` changed: the patched blocks and the configuration in force.

    ``tokens_seen`` of each block is filled in once the UNet has run (e.g. 4096 for SD 1.5's top
    level at 512 px). ``str()`` gives a few lines for a notebook: the blocks, then the settings.
    """

    config: AgentSDConfig
    max_downsample: int
    blocks: tuple[PatchedBlock, ...]
    total_blocks: int
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS

    def __str__(self) -> str:
        levels = sorted({block.downsample for block in self.blocks})
        tokens = sorted({block.tokens_seen for block in self.blocks if block.tokens_seen is not None})
        seen = f", {'/'.join(map(str, tokens))} tokens in the last call" if tokens else ""
        lines = [
            f"AgentSD patched {len(self.blocks)} of {self.total_blocks} transformer blocks "
            f"(downsample {'/'.join(map(str, levels)) or '-'} <= max_downsample={self.max_downsample}{seen})"
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
        upper = None
        for phase in config.phases:
            lower = round(phase.min_t * self.num_train_timesteps)
            if len(config.phases) == 1:
                span = "every step"
            elif upper is None:
                span = f"t >= {lower}"
            else:
                span = f"t < {upper}" if lower == 0 else f"{lower} <= t < {upper}"
            lines.append(f"  {span}: {phase.describe()}")
            upper = lower
        return "\n".join(lines)


def _merging_stages(config: AgentSDConfig, block: BasicTransformerBlock) -> list[Stage]:
    """The parts of ``block`` that run on merged tokens under ``config``, in the order they run."""
    wanted = {
        "attn1": config.merge_attn,
        "attn2": config.merge_crossattn and block.attn2 is not None,
        "ff": config.merge_mlp,
    }
    return [stage for stage, on in wanted.items() if on]


def _get_hook(unet: torch.nn.Module) -> UNetHook | None:
    registry = getattr(unet, "_diffusers_hook", None)
    return registry.get_hook(HOOK_NAME) if registry is not None else None


@dataclass(frozen=True)
class HookedModule:
    """A module that carries one of our hooks, and what removing it must undo.

    Attributes:
        module: The hooked module.
        created_registry: Whether we created its ``_diffusers_hook`` registry.
        had_forward: Whether it had an instance ``forward`` before (the registry sets one).
        forward: The ``forward`` the registry installed for our hook, to recognise a wrapper that
            another library put on top of it later (see :func:`_remove_hook`).
    """

    module: torch.nn.Module
    created_registry: bool
    had_forward: bool
    forward: Any


def _add_hook(module: torch.nn.Module, hook: ModelHook, owner: UNetHook) -> None:
    """Register ``hook`` on ``module`` and record in ``owner`` what removing it must undo."""
    created_registry = not hasattr(module, "_diffusers_hook")
    had_forward = "forward" in module.__dict__
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
    owner.hooked_modules.append(HookedModule(module, created_registry, had_forward, module.forward))


def _remove_hook(hooked: HookedModule) -> None:
    """Remove our hook from ``hooked.module`` and whatever we created for it.

    Accelerate's hooks (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``) wrap
    ``forward`` and call the wrapped one through ``module._old_forward``. If such a hook came after
    ours, the registry's removal would overwrite accelerate's ``forward`` and drop the offloading;
    instead accelerate's wrapper stays and its ``_old_forward`` is pointed past our hook.
    """
    module = hooked.module
    outer_forward = module.__dict__.get("forward")
    wrapped_by_accelerate = module.__dict__.get("_old_forward") is hooked.forward
    registry = module._diffusers_hook
    registry.remove_hook(HOOK_NAME, recurse=False)
    if wrapped_by_accelerate:
        module._old_forward = module.forward
        module.forward = outer_forward
    if hooked.created_registry and not registry.hooks:
        del module._diffusers_hook
        if not hooked.had_forward and not wrapped_by_accelerate:
            del module.forward


def _refresh_child_registries(unet: torch.nn.Module) -> None:
    """Tell the UNet's hook registry that hooks of its submodules changed.

    Recent diffusers registries cache the list of their descendants' registries; other hooks on
    the UNet (a cache hook's context, say) would otherwise keep walking a stale list.
    """
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def apply_patch(model: Any, config: AgentSDConfig | None = None, **knobs: Any) -> Any:
    """Make a Stable Diffusion pipeline or UNet generate with AgentSD.

    Args:
        model: A diffusers pipeline with a ``.unet`` (SD 1.x, 2.x, SDXL; text-to-image,
            image-to-image, inpainting, ControlNet) or a ``UNet2DConditionModel``.
        config: The settings; or pass them as keywords (``ratio=0.4``, ``schedule="fixed"``, ...),
            see :class:`AgentSDConfig`. Not both.

    Returns:
        ``model``, patched in place. Applying again replaces the previous patch; everything is
        checked before anything changes, so a failed call leaves the model as it was.
    """
    if config is not None and knobs:
        raise TypeError(f"pass either config or keyword settings, not both (got config and {sorted(knobs)})")
    if config is not None and not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an agentsd.AgentSDConfig, got {type(config).__name__}")
    config = config if config is not None else AgentSDConfig(**knobs)
    unet = _find_unet(model)
    blocks = [(site.name, site.module, site.downsample) for site in transformer_blocks(unet)]
    others = unsupported_blocks(unet)
    if not blocks:
        found = f"; its transformer blocks are {', '.join(others)}, which AgentSD does not support" if others else ""
        raise ValueError(f"{type(unet).__name__} has no BasicTransformerBlock to patch{found}")
    if others:
        warnings.warn(
            f"agentsd patches only BasicTransformerBlocks; this model's {', '.join(others)} blocks stay unpatched",
            stacklevel=2,
        )
    max_downsample = config.max_downsample or min(downsample for _, _, downsample in blocks)
    scheduler = getattr(model, "scheduler", None)
    num_train_timesteps = config.num_train_timesteps or getattr(
        getattr(scheduler, "config", None), "num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS
    )

    remove_patch(unet)
    state = UNetState(config=config, num_train_timesteps=num_train_timesteps)
    unet_hook = UNetHook(state, max_downsample=max_downsample, total_blocks=len(blocks))
    _add_hook(unet, unet_hook, unet_hook)
    for name, block, downsample in blocks:
        if downsample > max_downsample:
            continue
        stages = _merging_stages(config, block)
        if not stages:
            continue
        block_state = BlockState(
            unet=state, index=len(state.blocks), downsample=downsample, name=name, last_stage=stages[-1]
        )
        state.blocks.append(block_state)
        _add_hook(block, BlockHook(block_state), unet_hook)
        for stage in stages:
            merged = MergedStage(getattr(block, stage), block_state, stage)
            merged.install()
            unet_hook.stages.append(merged)
    _refresh_child_registries(unet)
    if not state.blocks:
        levels = "/".join(map(str, sorted({downsample for _, _, downsample in blocks})))
        why = (
            f"max_downsample={max_downsample} is below every attention level of this model (downsample {levels}); "
            "pass a larger max_downsample, or None for the top attention level"
            if all(downsample > max_downsample for _, _, downsample in blocks)
            else "merge_attn, merge_crossattn and merge_mlp are all False"
        )
        warnings.warn(f"agentsd patched none of the {len(blocks)} transformer blocks: {why}", stacklevel=2)
    logger.info("%s", patch_summary(unet))
    return model


def remove_patch(model: Any) -> Any:
    """Undo :func:`apply_patch`: every hook gone, the model as it was. A no-op on an unpatched model."""
    unet = _find_unet(model)
    unet_hook = _get_hook(unet)
    if unet_hook is None:
        return model
    for merged in reversed(unet_hook.stages):
        merged.remove()
    for hooked in reversed(unet_hook.hooked_modules):
        _remove_hook(hooked)
    _refresh_child_registries(unet)
    return model


def compile_unet(model: Any, **compile_kwargs: Any) -> Any:
    """``torch.compile`` a patched UNet so that CUDA graphs (``mode="reduce-overhead"``) can capture it whole.

    ``torch.compile(pipe.unet, fullgraph=True)`` works on a patched UNet too: nothing is read on the host,
    every phase of the schedule is a branch of a ``torch.cond`` in each patched block, and one graph
    serves a whole generation. But inductor runs a graph holding a ``torch.cond`` on CUDA without CUDA
    graphs (torch 2.11 to 2.13: the cond's lowering turns them off for the whole graph): with the recipe's
    two phases, ``mode="reduce-overhead"`` ran at 0.29x of the compiled unpatched UNet on an H200.

    Here the patch's UNet hook stays outside the compiled code and picks each call's phase on the host,
    as in eager mode (from a copy of the schedule made once: no sync per call); what is compiled is the
    rest of the call, for that phase, with no ``torch.cond``. Dynamo guards on the phase: a graph per
    phase of the schedule (two for the recipe, each compiled the first time its phase runs), each one
    whole, which CUDA graphs capture. Inside, each merging stage is a compile region traced once for
    the blocks of a level, as under ``torch.compile(unet)`` (on CUDA too: with one phase the region holds
    no cond), which more than halves the compile (the tiny SDXL UNet's cold compile on the CPU: 152 -> 67 s).

    The graphs are static (``dynamic=False``, which CUDA graphs record per shape anyway): with dynamic
    shapes dynamo would turn the phase's numbers into graph inputs once the second phase compiles, and
    a compile region cannot take them.

    Args:
        model: A pipeline or UNet patched by :func:`apply_patch`.
        **compile_kwargs: ``torch.compile``'s own (``mode``, ``fullgraph``, ``backend``, ...); ``dynamic``
            only ``False``.

    Returns:
        ``model``, its UNet compiled in place. :func:`remove_patch` drops the compiled code with the
        patch; :func:`apply_patch` again starts uncompiled.
    """
    unet = _find_unet(model)
    unet_hook = _get_hook(unet)
    if unet_hook is None:
        raise ValueError(
            f"compile_unet compiles a UNet patched by agentsd; {type(model).__name__} is not patched: call "
            "agentsd.apply_patch(model, ...) first (an unpatched UNet needs only torch.compile)"
        )
    dynamic = compile_kwargs.setdefault("dynamic", False)
    if dynamic is not False:
        raise ValueError(
            f"compile_unet compiles static graphs, one per phase: dynamic must be False (the default), got "
            f"{dynamic!r} (a new image size or batch compiles new graphs)"
        )
    unet_hook.compiled = torch.compile(unet_hook.phase_forward, **compile_kwargs)
    return model


def is_patched(model: Any) -> bool:
    """Whether ``model`` (a pipeline or UNet) currently carries an AgentSD patch."""
    return _get_hook(_find_unet(model)) is not None


def patch_summary(model: Any) -> PatchSummary | None:
    """The blocks AgentSD patched in ``model`` and the settings in force, or ``None`` if unpatched.

    A :class:`PatchSummary` is data (``.blocks``, ``.config``, ``.max_downsample``, ...); ``print()``
    or ``str()`` of it gives the few lines a notebook shows. ``None`` (not an empty summary) for an
    unpatched model, so ``if agentsd.patch_summary(pipe):`` reads as ``is_patched``.
    """
    unet_hook = _get_hook(_find_unet(model))
    if unet_hook is None:
        return None
    blocks = tuple(
        PatchedBlock(name=block.name, downsample=block.downsample, tokens_seen=block.tokens_seen)
        for block in unet_hook.state.blocks
    )
    return PatchSummary(
        config=unet_hook.state.config,
        max_downsample=unet_hook.max_downsample,
        blocks=blocks,
        total_blocks=unet_hook.total_blocks,
        num_train_timesteps=unet_hook.state.num_train_timesteps,
    )
