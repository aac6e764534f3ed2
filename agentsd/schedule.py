"""The schedule's rule: which phase runs at a given noise level, on the host or on the device.

A schedule is a tuple of :class:`~agentsd.config.Phase`, noisiest first. The noise level of a call
is its timestep as a fraction of the training horizon, ``t / num_train_timesteps`` (1 = pure noise,
0 = clean), and a phase covers the levels from its ``min_t`` up to the previous phase's. Stating
the rule in noise level rather than in step indices makes one schedule fit every step count, every
scheduler, image-to-image that starts part-way down, and any engine (ComfyUI speaks in sigmas and
turns them into timesteps with the model's own sampling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import Phase


def phase_index(phases: Sequence[Phase], level: float) -> int:
    """Index of the phase that covers noise level ``level`` (the last one below every ``min_t``)."""
    for index, phase in enumerate(phases):
        if level >= phase.min_t:
            return index
    return len(phases) - 1


def by_noise_level(
    level: torch.Tensor, phases: Sequence[Phase], branches: Sequence[Callable[..., torch.Tensor]], operands: tuple
) -> torch.Tensor:
    """``branches[i](*operands)`` for the phase that covers ``level``, chosen on the device.

    A chain of ``torch.cond``: every branch is in the graph and the predicate stays a tensor, so a
    traced model serves every step with one graph and reads nothing back to the host.
    """
    if len(phases) == 1:
        return branches[0](*operands)

    def later(*ops: torch.Tensor) -> torch.Tensor:
        return by_noise_level(level, phases[1:], branches[1:], ops)

    return torch.cond(level >= phases[0].min_t, branches[0], later, operands)


def phase_spans(phases: Sequence[Phase], num_train_timesteps: int) -> list[str]:
    """What each phase covers, in timesteps: ``["t >= 600", "t < 600"]``, or ``["every step"]``."""
    if len(phases) == 1:
        return ["every step"]
    spans, upper = [], None
    for phase in phases:
        lower = round(phase.min_t * num_train_timesteps)
        if upper is None:
            spans.append(f"t >= {lower}")
        else:
            spans.append(f"t < {upper}" if lower == 0 else f"{lower} <= t < {upper}")
        upper = lower
    return spans


def step_ranges(phase_of_step: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of equal phase in a list of per-step phase indices: ``(first step, last step, phase)``."""
    ranges: list[tuple[int, int, int]] = []
    for step, phase in enumerate(phase_of_step):
        if ranges and ranges[-1][2] == phase:
            ranges[-1] = (ranges[-1][0], step, phase)
        else:
            ranges.append((step, step, phase))
    return ranges
