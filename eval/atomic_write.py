"""Result files written whole or not at all.

A run that is killed, or a reader that looks while several processes write (``accelerate
launch``), must never see half a PNG or half a JSON file: a rerun trusts what exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto it once the block succeeds.

    The temporary name is hidden (a leading dot), ends in ``.tmp`` and carries the process id, so
    that two processes writing the same file never share one and image listings skip it. It is
    removed if the block fails.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries that a killed process left under ``folder``; return what was removed.

    A temporary whose process is still alive (another run writing into the same folder) is kept:
    removing it would make that process's rename fail.
    """
    removed = []
    for tmp in folder.rglob(".*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or a pid out of range)
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
