"""Running one stage of a transformer block on the block's merged tokens, for any engine.

A stage is a part of the block (self-attention, cross-attention or the feed-forward) that runs on
the tokens merged by the block's :class:`~agentsd.merge.MergePlan`: merge its input, run the layer
(or, for self-attention with agents, agent attention), unmerge its output. An engine adapter gives
the layer as a function of the tokens; :func:`run_merged` does the rest.

Traced in one graph (``torch.compile(unet, fullgraph=True)``, ``torch.export``), the phase is not
known on the host: :func:`stage_by_noise_level` holds every phase as a branch of a ``torch.cond``
on the noise level, each planning from the block input and running the stage. It takes plain
values only, so that it can be a compile region (:data:`stage_in_region`) traced once for all the
blocks of a level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .config import Phase
from .merge import MergePlan, make_layout, make_plan
from .schedule import by_noise_level

Layer = Callable[[torch.Tensor], torch.Tensor]
AgentLayer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def run_merged(plan: MergePlan, x: torch.Tensor, layer: Layer, agent_layer: AgentLayer | None = None) -> torch.Tensor:
    """A stage's output for tokens ``x`` [B, N, C], computed on ``plan``'s merged tokens.

    Args:
        plan: The block's merge plan for this call.
        x: The stage's input (for self-attention: ``norm1`` of the block input the plan was made from;
            the merged tokens and the agents are both made from it).
        layer: The stage's own computation, on merged tokens [B, M, C].
        agent_layer: ``agent_layer(merged, agent_tokens)``: self-attention through the agents; used
            when given and the plan has agents, else ``layer`` runs (plain ToMe).

    Returns:
        [B, N, C]: each token takes the output of the merged token it went into.
    """
    merged = plan.merge(x)
    if agent_layer is not None and plan.agents is not None:
        out = agent_layer(merged, plan.agents.merge(x))
    else:
        out = layer(merged)
    return plan.unmerge(out)


class Stage(Protocol):
    """A stage call as :func:`stage_by_noise_level` runs it: its output for tokens ``x`` on ``plan``."""

    def output(self, plan: MergePlan | None, x: torch.Tensor) -> torch.Tensor: ...


# Registers torch.ops.prims.inductor_force_stride_order: private to inductor, with an eager kernel.
import torch._inductor.inductor_prims  # noqa: E402, F401

_FORCE_STRIDE = torch.ops.prims.inductor_force_stride_order.default


def cond_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous operand of ``torch.cond``, in a layout inductor must keep.

    Inductor compiles a cond's branches for the strides its operands were traced with, but may lay
    an operand out otherwise (even a ``.contiguous()`` copy: a UNet's block input can arrive
    channel-strided), and the branch then fails its stride check at run time. Forcing the stride
    pins the layout; outside inductor it is ``t.contiguous()``.
    """
    t = t.contiguous()
    return _FORCE_STRIDE(t, t.stride())


def stage_by_noise_level(
    call: Stage,
    x: torch.Tensor,
    metric: torch.Tensor,
    key: torch.Tensor | None,
    level: torch.Tensor,
    grid: tuple[int, int],
    phases: tuple[tuple, ...],
) -> torch.Tensor:
    """A traced stage: ``call``'s output for ``x``, in the phase that covers noise level ``level``.

    Args:
        call: The stage (its ``output(plan, x)``).
        x: The stage's input tokens [B, N, C].
        metric: The block input [B, N, C], from which each branch plans.
        key: The block's random key, or ``None`` for fixed destinations.
        level: The call's noise level, a 0-d tensor.
        grid: The block's (h, w) token grid.
        phases: The fields of each :class:`~agentsd.config.Phase` that may run (plain tuples, so that
            the compile region sees constants).

    Returns:
        [B, N, C], the same shape in every branch, so the graph is the same at every step.
    """
    chosen = [Phase(*fields) for fields in phases]
    operands = (cond_operand(x), cond_operand(metric)) + (() if key is None else (key,))

    def branch(phase: Phase) -> Callable[..., torch.Tensor]:
        def run_phase(x: torch.Tensor, metric: torch.Tensor, *key_operand: torch.Tensor) -> torch.Tensor:
            layout = make_layout(grid, phase, key_operand[0] if key_operand else None, x.device)
            return call.output(make_plan(phase, layout, metric), x)

        return run_phase

    return by_noise_level(level, chosen, [branch(phase) for phase in chosen], operands)


#: :func:`stage_by_noise_level` as a compile region: dynamo traces it for the first block of a level and
#: stamps it out for the others, each with its own module and key (an operand, so that the code is the
#: same for every block: see :func:`~agentsd.layout.draw_keys`). Inductor then lowers and generates the
#: branches once per level instead of once per block, most of a patched UNet's compile time.
stage_in_region = torch.compiler.nested_compile_region(stage_by_noise_level)


def traced_stage(num_phases: int, on_cuda: bool) -> Callable[..., torch.Tensor]:
    """The traced stage runner for a call choosing among ``num_phases`` phases on a CUDA device or not.

    The one place the graph depends on the device. On CUDA a ``torch.cond`` stays at the top of the
    graph, where inductor sees it and runs the graph without CUDA graphs (``mode="reduce-overhead"``;
    ``compile_unet`` avoids the conds): inside a region it might capture the cond, and the host read
    of its predicate, in a CUDA graph. One phase has no cond, and its regions are what CUDA graphs
    capture. Elsewhere the region (one trace for all the blocks of a level) is always used.
    """
    return stage_in_region if num_phases == 1 or not on_cuda else stage_by_noise_level
