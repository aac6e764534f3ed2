"""Fresh virtual environments that borrow the running interpreter's packages, some of them left out.

Nothing is downloaded: the environment sees the packages of the interpreter running the tests (torch,
diffusers, ComfyUI's engine, ...) through symbolic links in one folder of its own, named by a ``.pth``
file after the environment's own site-packages, so that what is installed into the environment wins.
A package left out has no link there, neither its code nor its metadata: for that environment it is
not installed (``import`` and ``importlib.metadata`` fail as they do on a machine without it).
"""

from __future__ import annotations

import re
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

#: Always left out: ``agentsd`` itself (an installed copy, or the checkout's editable install with its
#: metadata and import hook): the environment gets the agentsd a test puts there.
ALWAYS_LEFT_OUT = ("agentsd",)


def running_site_packages(repo: Path) -> list[Path]:
    """The site-packages folders of the interpreter running the tests (never the checkout ``repo``).

    ``venv --system-site-packages`` would not do: run from a virtual environment, it exposes the *base*
    interpreter's site-packages, not the environment's, where torch and diffusers actually are.
    """
    folders = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    found: list[Path] = []
    for folder in map(Path, folders):
        # A venv inside the checkout (.venv/) is fine; the source tree itself never goes on the path.
        if folder.is_dir() and folder.resolve() != repo.resolve() and folder not in found:
            found.append(folder)
    return found


def _distribution(entry: str) -> str:
    """The package an entry of site-packages belongs to: ``diffusers-0.35.1.dist-info`` -> ``diffusers``."""
    return re.split(r"[-.]", entry, maxsplit=1)[0].lower().replace("-", "_")


def venv_borrowing_packages(venv: Path, repo: Path, leave_out: tuple[str, ...] = (), with_pip: bool = True) -> Path:
    """A fresh virtual environment seeing the running interpreter's packages but ``leave_out``; its python.

    Args:
        venv: Where to create it.
        repo: The checkout, whose editable install is left out too.
        leave_out: Packages (import names, such as ``"diffusers"``) the environment does not have.
        with_pip: Install pip into it (a few seconds); without, it is created in a fraction of one.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(venv)], check=True, timeout=300
    )
    python = venv / "bin" / "python"
    borrowed = venv / "borrowed"
    borrowed.mkdir()
    left_out = {name.lower().replace("-", "_") for name in (*leave_out, *ALWAYS_LEFT_OUT)}
    for folder in running_site_packages(repo):
        for entry in sorted(folder.iterdir()):
            name = entry.name
            # .pth files would not run from there (editable installs' hooks included): no link needed
            if name.endswith(".pth") or name.startswith("__") or _distribution(name) in left_out:
                continue
            if not (borrowed / name).exists():  # the first folder on the path wins, as on sys.path
                (borrowed / name).symlink_to(entry)
    done = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    (Path(done.stdout.strip()) / "_agentsd_test_borrowed.pth").write_text(f"{borrowed}\n")
    return python
