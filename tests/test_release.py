"""The release as a user gets it: the wheel and sdist build, and the installed wheel works on its own.

The package is built with setuptools' PEP 517 hooks from a copy of the repository (no network, no
build isolation), the wheel is installed into a fresh virtual environment, and the README's quick
start runs there on a tiny pipeline. The environment borrows torch, diffusers and transformers from the
interpreter running the tests (so nothing is downloaded), whether that is a virtual environment or a system
Python; the agentsd it imports must be the wheel's.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
from venvs import venv_borrowing_packages

import agentsd

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

#: Packages that drag in a torch build of their own choosing (torch-fidelity -> torchvision -> torch).
TORCH_REPLACERS = ("torchvision", "torch-fidelity", "torch_fidelity")


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH, which would put the source tree ahead of the wheel."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and the sdist, built from a copy of the repository so the tree stays clean."""
    root = tmp_path_factory.mktemp("release")
    source = root / "source"
    ignore = shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "__pycache__", ".venv*", "venv", "outputs")
    shutil.copytree(REPO, source, ignore=ignore)
    out = root / "dist"
    hooks = f"from setuptools import build_meta as b; b.build_wheel({str(out)!r}); b.build_sdist({str(out)!r})"
    _run(sys.executable, "-c", hooks, cwd=source, env=_clean_env())
    return {"wheel": next(out.glob("agentsd-*.whl")), "sdist": next(out.glob("agentsd-*.tar.gz"))}


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(archive.read(name))


@pytest.mark.slow
def test_wheel_carries_version_license_types_and_data(dist: dict[str, Path]) -> None:
    metadata = _metadata(dist["wheel"])
    assert metadata["Version"] == agentsd.__version__  # one place: pyproject reads agentsd.__version__
    with zipfile.ZipFile(dist["wheel"]) as archive:
        names = archive.namelist()
    assert "agentsd/py.typed" in names and "agentsd/data/imagenet1k_classes.txt" in names
    assert any(re.search(r"\.dist-info/(licenses/)?LICENSE$", name) for name in names), names


@pytest.mark.slow
def test_sdist_carries_what_a_rebuild_needs(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {"pyproject.toml", "README.md", "LICENSE", "agentsd/__init__.py", "agentsd/py.typed"}
    assert expected | {"agentsd/data/imagenet1k_classes.txt"} <= names


@pytest.mark.slow
def test_no_extra_can_replace_the_users_torch(dist: dict[str, Path]) -> None:
    """torch-fidelity needs torchvision, and pip picks a torchvision whose torch replaces the user's."""
    requirements = _metadata(dist["wheel"]).get_all("Requires-Dist") or []
    assert [r for r in requirements if r.lower().startswith(TORCH_REPLACERS)] == []
    core = [r for r in requirements if "extra ==" not in r]
    assert [r for r in core if r.startswith("torch")] == ["torch>=2.11"]


@pytest.mark.slow
def test_pipelines_extra_brings_what_a_pipeline_needs(dist: dict[str, Path]) -> None:
    """The core is torch and diffusers; StableDiffusionPipeline also needs transformers (README: Install)."""
    metadata = _metadata(dist["wheel"])
    assert "pipelines" in (metadata.get_all("Provides-Extra") or [])
    requirements = metadata.get_all("Requires-Dist") or []
    extra = {_name(re.split(r"[<>=!~; \[]", r, maxsplit=1)[0]) for r in requirements if "pipelines" in r}
    assert extra == {"transformers", "accelerate"}
    core = {_name(re.split(r"[<>=!~; \[]", r, maxsplit=1)[0]) for r in requirements if "extra ==" not in r}
    assert core == {"torch", "diffusers"}


@pytest.mark.slow
def test_installed_wheel_runs_the_quick_start(dist: dict[str, Path], tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    python = venv_borrowing_packages(venv, REPO)
    # --no-deps: torch, diffusers and transformers (what `agentsd[pipelines]` adds) are borrowed, not fetched.
    install = ("install", "--quiet", "--no-deps", "--no-index", dist["wheel"])
    _run(python, "-m", "pip", *install, cwd=tmp_path)
    quick_start = textwrap.dedent(
        f"""
        import sys
        from importlib.resources import files
        from pathlib import Path
        import numpy as np
        import torch
        sys.path.append({str(TESTS)!r})  # tiny.py only; never the source tree
        from tiny import tiny_pipeline
        import agentsd

        assert Path(agentsd.__file__).is_relative_to({str(venv)!r}), agentsd.__file__
        classes = (files("agentsd") / "data" / "imagenet1k_classes.txt").read_text().splitlines()
        assert len(classes) == 1000 and classes[:2] == ["tench", "goldfish"], classes[:2]

        pipe = tiny_pipeline("sd", Path({str(tmp_path)!r}) / "model")
        call = dict(num_inference_steps=2, output_type="np")
        before = pipe("a photo of a corgi", generator=torch.Generator().manual_seed(0), **call).images[0]
        agentsd.apply_patch(pipe, ratio=0.4)     # the published two-phase recipe
        print(agentsd.patch_summary(pipe))
        image = pipe("a photo of a corgi", generator=torch.Generator().manual_seed(0), **call).images[0]
        agentsd.remove_patch(pipe)               # back to exactly the pipeline it was
        after = pipe("a photo of a corgi", generator=torch.Generator().manual_seed(0), **call).images[0]
        assert not np.array_equal(image, before) and np.array_equal(after, before)
        print("quick start ok", agentsd.__version__)
        """
    )
    env = _clean_env() | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = _run(python, "-c", quick_start, cwd=tmp_path, env=env)
    assert f"quick start ok {agentsd.__version__}" in out
    assert "patched" in out  # patch_summary printed


# --- the declared floors and CI, kept in step -------------------------------------------------------


def _declared_floors() -> dict[str, str]:
    """``{package: version}`` of every ``package>=version`` in pyproject's dependencies and extras."""
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = (re.fullmatch(r"([\w.-]+)>=([\w.]+)", r) for r in project["dependencies"] + extras)
    return {_name(m[1]): m[2] for m in floors if m}


def _name(package: str) -> str:
    return package.strip().lower().replace("_", "-")


def test_ci_floors_are_the_declared_floors() -> None:
    """.ci/floors.txt pins exactly the floors pyproject.toml declares (torch aside: CI keeps its CPU pin)."""
    lines = (REPO / ".ci" / "floors.txt").read_text().splitlines()
    pins = dict(map(_name, line.split("==")) for line in lines if line.strip() and not line.startswith("#"))
    declared = _declared_floors()
    tested = ("diffusers", "transformers", "accelerate", "huggingface-hub", "tomesd", "torchmetrics")
    assert set(pins) - {"torch"} == set(tested)
    assert {name: pins[name] for name in tested} == {name: declared.get(name) for name in tested}


def test_ci_runs_the_readme_test_command_last() -> None:
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "pytest" in line and line.startswith("python -m pip"))
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    steps = [step.strip() for step in command.split("&&")]
    positions = [ci.index(step) for step in steps]  # ValueError: a step of the README is not in .ci/run
    assert positions == sorted(positions)
    assert ".ci/floor-run" in ci and ci.index(".ci/floor-run") < positions[-1]  # the main summary ends the log
    # ... in a fresh venv of its own, so that packages left on the CI machine cannot hide a missing install
    before = ci[: positions[0]]
    made = next(i for i, line in enumerate(before) if re.fullmatch(r'python3 -m venv "(\$\w+)/venv"', line))
    assert any(re.fullmatch(r'(source|\.) "\$\w+/venv/bin/activate"', line) for line in before[made:])


def test_readme_knob_table_gives_the_phase_defaults() -> None:
    """Every defaulted field of agentsd.Phase appears with its default in the README's "Every knob" table."""
    import dataclasses

    readme = (REPO / "README.md").read_text()
    table = readme.split("## Every knob", 1)[1].split("\n#", 1)[0]
    row = next(line for line in table.splitlines() if line.startswith("| `Phase("))
    for field in dataclasses.fields(agentsd.Phase):
        if field.default is not dataclasses.MISSING:
            assert f"{field.name}={field.default:g}" in row, (field.name, row)


def test_public_names_all_resolve() -> None:
    """The diffusers adapter's names load on first use (agentsd/__init__.py): every name of ``__all__``
    resolves to the adapter's own object, ``dir`` lists them all, and an unknown name is an AttributeError.
    (``import agentsd`` without diffusers: tests/test_comfyui.py.)"""
    import agentsd.diffusers_patch

    for name in agentsd.__all__:
        assert getattr(agentsd, name) is getattr(agentsd.diffusers_patch, name, getattr(agentsd, name)), name
    assert agentsd.apply_patch is agentsd.diffusers_patch.apply_patch
    assert set(agentsd.__all__) <= set(dir(agentsd)) and "block" in dir(agentsd)
    assert not hasattr(agentsd, "no_such_name")
