"""Timing helpers shared by eval/speed.py, eval/fid.py and the examples: one of each.

* :func:`synchronize` waits for a device's queued work (CUDA, MPS; nothing on the CPU), so that
  :func:`timed` measures the work of a call and not only its launch.
* :func:`peak_memory`: the peak of the memory allocated during a call above what was allocated
  before it (weights and inputs excluded). On CUDA it comes from torch's allocator statistics; on
  CPU from the allocation and free events that ``torch.profiler`` records for torch tensors (memory
  allocated outside torch's allocator, such as oneDNN scratch space, is not seen).
* :func:`machine_load`, :func:`busy` and :func:`warn_if_busy`: timings are only as good as the
  machine is quiet; a load average above the CPU count says other work competed for the cores.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# Kineto (torch.profiler's backend, used for CPU peak memory) prints "USDT: ... profiler_start" and
# "profiler_stop" lines on stderr around every profiling session unless its log level is above 5.
# It reads the level once, when the first profiler of the process starts: hence here, at import.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402

CPUS = os.cpu_count() or 1
#: Load average above the CPU count that still counts as quiet: the kernel's and Python's own helper
#: threads put a 2-thread run on 2 CPUs at about 2.1, with nothing else running.
LOAD_SLACK = 0.5


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run the work queued on it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(call: Callable[[], Any], device: torch.device) -> float:
    """Seconds that ``call()`` takes on ``device``, its queued work included."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory(call: Callable[[], Any], device: torch.device) -> int:
    """Bytes: peak allocated during ``call`` above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # The raw allocation (+) and free (-) events in time order; their running sum is the memory
    # held by tensors allocated during the call.
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda event: event.start_ns())
    return max(itertools.accumulate((event.nbytes() for event in events), initial=0))


def machine_load() -> float | None:
    """The 1-minute load average (runnable threads, this run's own included), or ``None`` where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy(load: float | None, cpus: int) -> bool:
    """Whether more threads wanted a core than there are cores (by more than ``LOAD_SLACK``): some
    waited, timings stretched."""
    return load is not None and load > cpus + LOAD_SLACK


def warn_if_busy(who: str, when: str, cpus: int | None = None) -> bool:
    """Say so on stderr, at once, when the machine is busy; ``who`` names the script, ``when`` before
    which calls, ``cpus`` the cores (:data:`CPUS` by default). Returns whether it warned."""
    load, cpus = machine_load(), CPUS if cpus is None else cpus
    if not busy(load, cpus):
        return False
    print(
        f"{who}: WARNING: load average {load:.1f} on {cpus} CPUs {when}: other work is running; "
        "the timings will be slower and noisier than on a quiet machine",
        file=sys.stderr,
        flush=True,
    )
    return True
