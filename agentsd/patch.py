"""Patching a diffusers UNet with AgentSD, and removing the patch.

Three pieces of diffusers machinery carry the whole method, with no class rewriting:

* a hook on the UNet (:class:`UNetHook`) reads the latent size from ``sample`` (positional or
  keyword) and picks the schedule's phase from ``timestep`` before every call;
* a hook on each patched ``BasicTransformerBlock`` (:class:`BlockHook`) plans the merge from the
  block's input, which is the similarity metric, and drops the plan when the block returns;
* attention processors on ``attn1`` (and ``attn2`` with ``merge_crossattn``) apply the plan, and a
  hook on ``ff`` does so with ``merge_mlp``.

The UNet hook is the registry of everything that was changed: it keeps the original processors
and the hooks it added, so :func:`remove_patch` restores the model exactly.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

from .attention import AgentSDAttnProcessor, AttentionProcessor, TokenMergeProcessor
from .config import AgentSDConfig, Phase
from .merge import GridLayout, MergePlan, plan_merge

logger = logging.getLogger("agentsd")

#: The parts of a transformer block that can run on merged tokens, in the order they run.
Stage = Literal["attn1", "attn2", "ff"]

HOOK_NAME = "agentsd"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class UNetState:
    """What every patched block of one UNet needs to know about the current call.

    :meth:`start_call` runs once per UNet call, outside any compiled region: it reads the timestep
    (the one host-device synchronisation of a call, when the timestep lives on the device), picks
    the phase and draws every block's :class:`~agentsd.merge.GridLayout` on the model's device. The
    blocks then only read Python values and device tensors, so they compile with
    ``fullgraph=True`` and never wait for the device.
    """

    config: AgentSDConfig
    num_train_timesteps: int
    blocks: list[BlockState] = field(default_factory=list)
    phase: Phase | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))

    def start_call(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> None:
        """Pick the phase, reseed the destination choice and lay out every block's grid for this call."""
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        self.phase = self.config.phase_at(t, self.num_train_timesteps)
        # The destination pattern depends only on the seed and the noise level, never on what ran
        # before, so the same generation twice gives the same image.
        self.generator.manual_seed(self.config.seed * 1_000_003 + round(t * 1000))
        # Odd batches cannot hold whole (prompted, unprompted) pairs: random destinations would give
        # the two halves of a pair different plans, so use the fixed top-left ones.
        generator = self.generator if self.config.use_rand and sample.shape[0] % 2 == 0 else None
        fixed: dict[tuple[int, int], GridLayout] = {}
        # Blocks are listed in the order they run, so the generator draws for them in that order.
        for block in self.blocks:
            h, w = (math.ceil(side / block.downsample) for side in sample.shape[-2:])
            block.tokens_seen = h * w
            if int(h * w * self.phase.ratio) <= 0:
                block.layout = None
            elif generator is not None:
                block.layout = GridLayout.draw(h, w, self.phase.sx, self.phase.sy, generator, sample.device)
            else:
                if (h, w) not in fixed:
                    fixed[h, w] = GridLayout.draw(h, w, self.phase.sx, self.phase.sy, None, sample.device)
                block.layout = fixed[h, w]


@dataclass(eq=False)
class BlockState:
    """One patched transformer block (``name``: its path in the UNet, in the summary): its resolution
    level, and the grid layout and merge plan of the current call."""

    unet: UNetState
    downsample: int
    name: str = ""
    last_stage: Stage = "attn1"
    layout: GridLayout | None = None
    plan: MergePlan | None = None
    tokens_seen: int | None = None

    @property
    def config(self) -> AgentSDConfig:
        return self.unet.config

    def take_plan(self, stage: Stage) -> MergePlan | None:
        """The plan of the current call for ``stage``; the block's last merging stage also drops it.

        Releasing the plan as soon as its last user has it keeps its index tensors out of the
        block's later memory peaks (the feed-forward's activations are the largest at the top level).
        """
        plan = self.plan
        if stage == self.last_stage:
            self.plan = None
        return plan

    def make_plan(self, x: torch.Tensor) -> MergePlan | None:
        """The merge plan for block input ``x`` [B, N, C] under the current phase.

        Everything here is shape arithmetic and dense tensor work: no value of ``x`` decides a branch.
        """
        layout, phase = self.layout, self.unet.phase
        if layout is None or phase is None:
            return None
        num_tokens = x.shape[1]
        if num_tokens != layout.num_tokens:
            logger.warning(
                "agentsd: a block expected a grid of %d tokens but got %d; it runs unmerged",
                layout.num_tokens,
                num_tokens,
            )
            return None
        return plan_merge(x, layout, r=int(num_tokens * phase.ratio), agent_r=int(num_tokens * phase.agent_ratio))


def _call_argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs[name]


@dataclass(eq=False)
class WrappedAttention:
    """An attention layer whose processor AgentSD wraps.

    Attributes:
        attn: The ``Attention`` module.
        inner: The processor AgentSD wraps, and the one :func:`remove_patch` puts back.
        wrapper: The AgentSD processor installed around ``inner``.
    """

    attn: Attention
    inner: AttentionProcessor
    wrapper: TokenMergeProcessor

    def adopt_replacement(self) -> str | None:
        """Wrap a processor that was set after the patch; return its class name, or ``None`` if none was.

        ``set_attn_processor``, ``fuse_qkv_projections`` and ``load_ip_adapter`` replace every
        processor. Wrapping the new one keeps AgentSD on, around whatever attention the user chose,
        instead of leaving blocks that plan merges no processor applies.
        """
        current = self.attn.processor
        if current is self.wrapper:
            return None
        # diffusers' loaders rebuild processors as `type(processor)()`: a detached copy of ours.
        self.inner = current.inner if isinstance(current, TokenMergeProcessor) else current
        self.wrapper = type(self.wrapper)(self.wrapper.block, self.inner)
        self.attn.set_processor(self.wrapper)
        return type(self.inner).__name__

    def restore(self) -> None:
        """Put back the wrapped processor; a processor the user set since then stays (unwrapped)."""
        current = self.attn.processor
        if isinstance(current, TokenMergeProcessor):  # ours, or a detached copy a loader made of it
            self.attn.set_processor(current.inner)


class UNetHook(ModelHook):
    """Starts each UNet call (phase, grid layouts); owns everything the patch changed."""

    def __init__(self, state: UNetState, max_downsample: int, total_blocks: int) -> None:
        super().__init__()
        self.state = state
        self.max_downsample = max_downsample
        self.total_blocks = total_blocks
        self.wrapped: list[WrappedAttention] = []
        self.hooked_modules: list[HookedModule] = []

    # The one piece that cannot be traced: the timestep's value picks the phase and seeds the draw.
    # Under whole-model torch.compile this is a single graph break per UNet call.
    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        adopted = {name for wrapped in self.wrapped if (name := wrapped.adopt_replacement())}
        if adopted:
            logger.info("agentsd: attention processors set after apply_patch (%s) are now wrapped", ", ".join(adopted))
        self.state.start_call(_call_argument(args, kwargs, 0, "sample"), _call_argument(args, kwargs, 1, "timestep"))
        return args, kwargs


class BlockHook(ModelHook):
    """Plans the block's merge from its input, and forgets the plan once the block has run."""

    def __init__(self, state: BlockState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.state.plan = self.state.make_plan(_call_argument(args, kwargs, 0, "hidden_states"))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.state.plan = None
        return output


class FeedForwardHook(ModelHook):
    """``merge_mlp``: the feed-forward runs on merged tokens.

    A feed-forward chunked along the tokens (``set_chunk_feed_forward(dim=1)``) sees partial
    sequences, which the plan does not fit; those calls run unmerged.
    """

    def __init__(self, state: BlockState) -> None:
        super().__init__()
        self.state = state
        self.pending: MergePlan | None = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        x = _call_argument(args, kwargs, 0, "hidden_states")
        plan = self.state.take_plan("ff")
        if plan is None or x.shape[1] != plan.num_tokens:
            return args, kwargs
        self.pending = plan
        return (plan.merge(x), *args[1:]), kwargs

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        plan, self.pending = self.pending, None
        return output if plan is None else plan.unmerge(output)


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
        schedule = config.schedule if isinstance(config.schedule, str) else "custom"
        parts = {"merge_attn": "self-attention", "merge_crossattn": "cross-attention", "merge_mlp": "feed-forward"}
        merged = [part for name, part in parts.items() if getattr(config, name)]
        lines.append(
            f"  schedule {schedule!r}, ratio {config.ratio:g}, merging in {', '.join(merged) or 'nothing'}, "
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


def _find_unet(model: Any) -> torch.nn.Module:
    unet = getattr(model, "unet", model)
    if isinstance(unet, torch.nn.Module) and all(
        hasattr(unet, name) for name in ("down_blocks", "up_blocks", "conv_in")
    ):
        return unet
    transformer = getattr(model, "transformer", model)
    if isinstance(transformer, torch.nn.Module) and "Transformer" in type(transformer).__name__:
        raise TypeError(
            f"{type(model).__name__} is built on a transformer ({type(transformer).__name__}), not a UNet: "
            "AgentSD patches the UNet of Stable Diffusion 1.x, 2.x and SDXL pipelines; transformer models "
            "(SD3, Flux, PixArt, DiT, ...) are not supported"
        )
    raise TypeError(
        f"model must be a diffusers pipeline with a `.unet` or a UNet2DConditionModel, got {type(model).__name__}"
    )


def _other_transformer_blocks(unet: torch.nn.Module) -> list[str]:
    """Class names of transformer blocks in ``unet`` that are not ``BasicTransformerBlock`` (left unpatched)."""
    return sorted(
        {
            type(module).__name__
            for module in unet.modules()
            if type(module).__name__.endswith("TransformerBlock") and not isinstance(module, BasicTransformerBlock)
        }
    )


def _transformer_blocks(unet: torch.nn.Module) -> list[tuple[str, BasicTransformerBlock, int]]:
    """Every ``BasicTransformerBlock`` of the UNet with its downsample factor (1 = latent resolution).

    The factor follows from where the block sits: down block i and up block (n - 1 - i) work at
    2**i, the mid block at the coarsest level. Blocks are listed in the order they run.
    """
    levels = len(unet.down_blocks)
    scopes = [(f"down_blocks.{i}", unet.down_blocks[i], 2**i) for i in range(levels)]
    if getattr(unet, "mid_block", None) is not None:
        scopes.append(("mid_block", unet.mid_block, 2 ** (levels - 1)))
    scopes += [(f"up_blocks.{i}", unet.up_blocks[i], 2 ** (levels - 1 - i)) for i in range(len(unet.up_blocks))]
    found = []
    for prefix, scope, downsample in scopes:
        for name, module in scope.named_modules():
            if isinstance(module, BasicTransformerBlock):
                found.append((f"{prefix}.{name}", module, downsample))
    return found


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
    blocks = _transformer_blocks(unet)
    others = _other_transformer_blocks(unet)
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
        block_state = BlockState(unet=state, downsample=downsample, name=name, last_stage=stages[-1])
        state.blocks.append(block_state)
        _add_hook(block, BlockHook(block_state), unet_hook)
        for stage in stages:
            if stage == "ff":
                _add_hook(block.ff, FeedForwardHook(block_state), unet_hook)
                continue
            attn = getattr(block, stage)
            processor_class = AgentSDAttnProcessor if stage == "attn1" else TokenMergeProcessor
            wrapped = WrappedAttention(attn, attn.processor, processor_class(block_state, attn.processor))
            unet_hook.wrapped.append(wrapped)
            attn.set_processor(wrapped.wrapper)
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
    """Undo :func:`apply_patch`: original processors back, hooks gone. A no-op on an unpatched model."""
    unet = _find_unet(model)
    unet_hook = _get_hook(unet)
    if unet_hook is None:
        return model
    for wrapped in unet_hook.wrapped:
        wrapped.restore()
    for hooked in reversed(unet_hook.hooked_modules):
        _remove_hook(hooked)
    _refresh_child_registries(unet)
    return model


def is_patched(model: Any) -> bool:
    """Whether ``model`` (a pipeline or UNet) currently carries an AgentSD patch."""
    return _get_hook(_find_unet(model)) is not None


def patch_summary(model: Any) -> PatchSummary | None:
    """The blocks AgentSD patched in ``model`` and the settings in force, or ``None`` if unpatched."""
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
