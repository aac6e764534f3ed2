"""Counting the aten operations that run under a ``TorchDispatchMode``: what the tests and
``benchmarks/ops.py`` see of the host's work."""

from __future__ import annotations

import collections
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

#: The operators that make the host wait for the device's values.
SYNCING = ("_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal", "unique")


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched while active, by name (``counter.ops["argsort"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> dict[str, int]:
        """How many times each syncing operator ran (those that ran at all)."""
        return {name: self.ops[name] for name in SYNCING if self.ops[name]}
