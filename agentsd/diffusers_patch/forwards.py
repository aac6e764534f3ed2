"""The forwards the patch puts on a model, its blocks and their layers, and the record that takes them off.

Every module the patch touches gets a new instance ``forward`` and one :class:`Override` record,
which says what to put back and how to make the forward again for a copy of the model. Each calls
the forward the module had before (its class's, or another library's instance ``forward``), so
nothing set up before the patch is skipped.

The blocks and their layers get plain closures, not objects or hooks: dynamo guards a callable
object (or a ``functools.partial``) by identity, so each block of a regionally compiled UNet would
compile anew, while a function is guarded by its code and one graph serves all the blocks of a
level. The model's forward is a function too, around the :class:`UNetForward` object that holds its call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import AgentSettings
from .blocks import StageKind
from .joint_layers import JointCall, joint_processors
from .layers import StageCall, accepted_keywords, processor_kwargs, runs_plain_softmax
from .state import BlockState, UNetState


def call_argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    """Argument ``name`` of a call, passed at ``position`` or by keyword."""
    return args[position] if len(args) > position else kwargs[name]


class UNetForward:
    """The patched ``forward`` of a UNet or diffusion transformer: starts and ends each call (latent
    size, timestep, phase) and calls the forward from before the patch.

    Attributes:
        module: The model.
        state: The UNet's per-call state.
        previous: The UNet's instance ``forward`` from before the patch, or ``None`` (its class's).
        class_forward: The ``forward`` function of the UNet's class.
        compiled: The call compiled by ``compile_unet`` (phase chosen before it), or ``None``.
    """

    def __init__(self, module: torch.nn.Module, state: UNetState, previous: Callable[..., Any] | None) -> None:
        self.module = module
        self.state = state
        self.previous = previous
        self.class_forward = type(module).forward
        self.compiled: Callable[..., Any] | None = None
        # What inspect.signature (and so torch.export) reads: the signature of the forward it replaces.
        self.__wrapped__ = self.previous if self.previous is not None else self.class_forward.__get__(module)

    def original(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return self.class_forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        timestep = self.state.backbone.timestep(args, kwargs)
        if self.compiled is not None:  # the rest of the start is in the compiled graph
            self.state.choose_phase(timestep)
            return self.compiled(*args, **kwargs)
        latent_size = self.state.backbone.latent_size(args, kwargs, self.state.ids_grid)
        self.state.start_call(self.state.backbone.sample(args, kwargs), timestep, latent_size)
        output = self.original(*args, **kwargs)
        self.state.end_call()
        return output

    def phase_forward(self, *args: Any, **kwargs: Any) -> Any:
        """What ``compile_unet`` compiles: the call's device work and the UNet's own forward, for the
        phase chosen on the host (dynamo guards on it: a graph per phase)."""
        latent_size = self.state.backbone.latent_size(args, kwargs, self.state.ids_grid)
        backbone = self.state.backbone
        self.state.start_on_device(backbone.sample(args, kwargs), backbone.timestep(args, kwargs), latent_size)
        output = self.original(*args, **kwargs)
        self.state.end_call()
        return output


def unet_forward(call: UNetForward) -> Callable[..., Any]:
    """The UNet's patched ``forward``: a function (``torch.export`` reads its code and signature) that
    runs ``call``, reachable as its ``call`` attribute."""

    @functools.wraps(call.__wrapped__)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    forward.call = call
    return forward


def block_forward(
    module: torch.nn.Module, state: BlockState, previous: Callable[..., Any] | None
) -> Callable[..., Any]:
    """A block's patched ``forward``: hands the block input to its state (the similarity metric), runs
    the block (``previous``, its instance ``forward`` before the patch, or its class's), and clears the plan."""
    class_forward = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        state.start(call_argument(args, kwargs, 0, "hidden_states"))
        output = previous(*args, **kwargs) if previous is not None else class_forward(module, *args, **kwargs)
        state.finish()
        return output

    return forward


def stage_forward(
    module: torch.nn.Module,
    state: BlockState,
    stage: str,
    kind: StageKind,
    previous: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """The patched ``forward`` of one part of a block (``attn1``, ``attn2``, ``ff``, a joint ``attn``): it
    describes the call (:class:`~agentsd.diffusers_patch.layers.StageCall`, or
    :class:`~agentsd.diffusers_patch.joint_layers.JointCall` for joint attention) and hands it to the
    block, which merges, runs the layer's own forward (in self- and joint attention, agent attention
    where it may stand in for the processor), and unmerges. ``previous``: the module's instance
    ``forward`` before the patch, if any.
    """
    if kind == "joint":
        return joint_forward(module, state, stage, previous)
    agents = AgentSettings.of(state.config) if kind == "self" else None
    accepted: dict[type, frozenset[str]] = {}

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kind == "ff" or previous is not None:
            call = StageCall(module, stage, previous, args, kwargs, None, kind == "ff")
        else:
            processor = module.processor
            keywords = accepted.get(type(processor))
            if keywords is None:  # read once per processor class (traced: every time, keeping the graph pure)
                keywords = accepted_keywords(processor)
                if not torch.compiler.is_compiling():
                    accepted[type(processor)] = keywords
            given = dict(zip(("encoder_hidden_states", "attention_mask"), args)) | kwargs
            call_kwargs, plain_self_attention = processor_kwargs(given, keywords)
            stands_in = agents if plain_self_attention and runs_plain_softmax(module) else None
            call = StageCall(module, stage, None, (), call_kwargs, stands_in)
        return state.run(call, hidden_states)

    return forward


#: What a joint attention layer's forward always hands its processor.
JOINT_ARGUMENTS = frozenset({"encoder_hidden_states", "attention_mask", "image_rotary_emb"})


def joint_forward(
    module: torch.nn.Module, state: BlockState, stage: str, previous: Callable[..., Any] | None
) -> Callable[..., Any]:
    """The patched ``forward`` of a joint attention layer (SD3, Flux): see :func:`stage_forward`."""
    agents = AgentSettings.of(state.config)
    text_first = state.unet.backbone.text_first
    accepted: dict[type, frozenset[str]] = {}

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if previous is not None:
            call = JointCall(module, stage, previous, args, kwargs, text_first, False, None)
            return state.run(call, hidden_states)
        processor = module.processor
        keywords = accepted.get(type(processor))
        if keywords is None:  # read once per processor class (traced: every time, keeping the graph pure)
            keywords = accepted_keywords(processor) | JOINT_ARGUMENTS
            if not torch.compiler.is_compiling():
                accepted[type(processor)] = keywords
        names = ("encoder_hidden_states", "attention_mask", "image_rotary_emb")
        given = dict(zip(names, args)) | kwargs
        call_kwargs = {name: value for name, value in given.items() if name in keywords}
        own = type(processor) in joint_processors()
        call = JointCall(module, stage, None, (), call_kwargs, text_first, own, agents if own else None)
        return state.run(call, hidden_states)

    return forward


@dataclass(eq=False)
class Override:
    """One module whose ``forward`` the patch replaced: what was there, what is there, and how to
    make it again for a copy of the module.

    Attributes:
        module: The module.
        part: ``"unet"`` (the model), ``"block"``, or the stage's attribute name (``"attn1"``, ``"attn"``, ...).
        state: The model's state (``"unet"``) or the block's.
        kind: The stage's kind (stages only).
        previous: The module's instance ``forward`` from before the patch, or ``None`` (its class's).
        installed: The patched forward put in place.
    """

    module: torch.nn.Module
    part: str
    state: UNetState | BlockState
    kind: StageKind | None = None
    previous: Callable[..., Any] | None = None
    installed: Callable[..., Any] | None = None

    def install(self) -> Override:
        """Put the patched forward on the module, keeping the one it had."""
        self.previous = self.module.__dict__.get("forward")
        self.put()
        return self

    def put(self, stale: Callable[..., Any] | None = None) -> None:
        """Make the patched forward for this record's module and state, and put it in place of
        ``stale`` (a copy's forward, still the original's) or on the module."""
        if self.part == "unet":
            self.installed = unet_forward(UNetForward(self.module, self.state, self.previous))
        elif self.part == "block":
            self.installed = block_forward(self.module, self.state, self.previous)
        else:
            self.installed = stage_forward(self.module, self.state, self.part, self.kind, self.previous)
        if stale is not None and self.module.__dict__.get("_old_forward") is stale:
            self.module._old_forward = self.installed
        else:
            self.module.forward = self.installed

    def remove(self) -> None:
        """Put the module's ``forward`` back; past a wrapper that accelerate added on top, if any.

        Accelerate's hooks (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``) wrap
        ``forward`` and call the wrapped one through ``module._old_forward``. If such a hook came after
        the patch, its wrapper stays and its ``_old_forward`` is pointed past the patch.
        """
        module, previous = self.module, self.previous
        if module.__dict__.get("_old_forward") is self.installed:
            module._old_forward = previous if previous is not None else type(module).forward.__get__(module)
        elif module.__dict__.get("forward") is self.installed:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
