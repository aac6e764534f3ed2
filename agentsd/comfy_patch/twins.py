"""Twins of a ComfyUI model's modules: what AgentSD puts in through ComfyUI's object patches.

A twin is a shallow copy of a module whose class adds one thing (records its input, merges its
input, unmerges its output) to the module's own forward. It shares the original's parameter and
buffer dictionaries, so weight patches (LoRA) reach the same tensors under the same names, and
ComfyUI's unpatching puts back the original module, untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

_CLASSES: dict[tuple[type, type], type] = {}


def twin(module: torch.nn.Module, mixin: type, block: Any) -> torch.nn.Module:
    """A twin of ``module`` whose class is ``mixin`` over the module's own class, serving ``block``
    (its ``agentsd_block``)."""
    cls = type(module)
    if (mixin, cls) not in _CLASSES:
        _CLASSES[mixin, cls] = type(f"AgentSD{cls.__name__}", (mixin, cls), {})
    copied = copy.copy(module)
    copied.__class__ = _CLASSES[mixin, cls]
    copied.agentsd_block = block
    return copied
