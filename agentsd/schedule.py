"""The schedule's rule: which phase runs at a given noise level, on the host or on the device.

A schedule is a tuple of :class:`~agentsd.config.Phase`, noisiest first. The noise level of a call
is its timestep as a fraction of the training horizon, ``t / num_train_timesteps`` (1 = pure noise,
0 = clean), and a phase covers the levels from its ``min_t`` up to the previous phase's. Stating
the rule in noise level rather than in step indices makes one schedule fit every step count, every
scheduler, image-to-image that starts part-way down, and any engine (ComfyUI speaks in sigmas and
turns them into timesteps with the model's own sampling). A model that speaks in EDM's
``c_noise = log(sigma) / 4`` instead of timesteps is mapped onto Stable Diffusion's own noise
schedule (:func:`edm_noise_level`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .config import Phase


def _sd_log_sigmas(num_train_timesteps: int = 1000) -> list[float]:
    """log(sigma) of Stable Diffusion's training schedule (scaled linear betas 0.00085 ... 0.012), per timestep."""
    start, end = 0.00085**0.5, 0.012**0.5
    log_sigmas, alpha_bar = [], 1.0
    for t in range(num_train_timesteps):
        beta = (start + (end - start) * t / (num_train_timesteps - 1)) ** 2
        alpha_bar *= 1 - beta
        log_sigmas.append(0.5 * math.log((1 - alpha_bar) / alpha_bar))
    return log_sigmas


SD_LOG_SIGMAS = _sd_log_sigmas()


def edm_noise_level(c_noise: torch.Tensor) -> torch.Tensor:
    """The noise level (``t / 1000`` of SD's schedule) of an EDM UNet timestep ``c_noise = log(sigma) / 4``.

    Linear in log(sigma) between SD's timesteps, clamped to [0, 0.999]. Tensor ops only, so a traced
    call computes it on the device.
    """
    table = torch.tensor(SD_LOG_SIGMAS, dtype=torch.float32, device=c_noise.device)
    log_sigma = (4 * c_noise.to(torch.float32)).clamp(table[0], table[-1])
    upper = torch.searchsorted(table, log_sigma.reshape(1)).clamp(1, len(SD_LOG_SIGMAS) - 1)
    low, high = table[upper - 1], table[upper]
    t = (upper - 1).to(torch.float32) + (log_sigma.reshape(1) - low) / (high - low)
    return (t / len(SD_LOG_SIGMAS)).reshape(c_noise.shape)


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
