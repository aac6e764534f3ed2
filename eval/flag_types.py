"""Argument types of eval/speed.py's flags: each refuses a bad value with what it expected."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def _number(text: str, kind: type[int | float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return parse


def resolution(text: str) -> int:
    value = _number(text, int)
    if value <= 0 or value % 64:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 64 pixels, got {text}")
    return value


def ratio(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 0.75:
        # tomesd and the ToMe phase use 2x2 destination cells: at most 3 of every 4 tokens merge.
        raise argparse.ArgumentTypeError(f"must be in (0, 0.75], got {text}")
    return value


def timestep(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < 1000:
        raise argparse.ArgumentTypeError(f"must be a training timestep in [0, 999], got {text}")
    return value


def device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but CUDA is not available")
    return device
