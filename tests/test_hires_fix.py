"""The hires fix, end to end on tiny models: the example (examples/hires_fix.py) and the benchmark's
hires pass (eval/speed.py --mode hires, --suite hires). Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image
from tiny import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
TILE = 32  # the tiny SD pipeline's native size: the first pass; the second is twice that


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` with examples/ on sys.path, as when it runs as a script."""
    if str(REPO / "examples") not in sys.path:
        sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location(f"agentsd_example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "sd", "sd")


@pytest.mark.parametrize("upscale", ["latent", "image"])
def test_example_writes_the_second_pass_at_twice_the_size(sd_model: Path, tmp_path: Path, upscale: str, capsys):
    hires_fix = load_example("hires_fix")
    argv = ["--model", str(sd_model), "--steps", "2", "--strength", "0.5", "--upscale", upscale, "--device", "cpu"]
    out = hires_fix.main([*argv, "--out", str(tmp_path)])
    assert out == tmp_path / "hires_fix.png"
    with Image.open(out) as sheet:
        assert sheet.width == 3 * 2 * TILE  # SD, ToMeSD, AgentSD, each 2x the native 32 px
    assert "AgentSD runs its ToMe phase there" in capsys.readouterr().out


def test_example_refuses_a_second_pass_of_no_step(sd_model: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        load_example("hires_fix").main(["--model", str(sd_model), "--steps", "1", "--strength", "0.5"])
    assert "runs no denoising step" in capsys.readouterr().err


@pytest.fixture
def speed(monkeypatch):
    """eval/speed.py as a module, with eval/ on sys.path as when it runs as a script."""
    monkeypatch.syspath_prepend(str(REPO / "eval"))
    return importlib.import_module("speed")


def test_benchmark_times_the_hires_pass_and_says_the_recipe_runs_its_tome_phase(speed, tmp_path, capsys):
    argv = ["--arch", "tiny", "--mode", "hires", "--resolutions", "128", "--steps", "4", "--repeats", "1"]
    argv += ["--methods", *speed.SUITES["hires"].settings["methods"], "--threads", "1", "--out", str(tmp_path)]
    speed.main(argv)
    results = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert [(r["mode"], r["resolution"], r["steps"], r["method"]) for r in results] == [
        ("hires", 128, 4, "sd"),
        ("hires", 128, 4, "todo"),
        ("hires", 128, 4, "tomesd-r0.4"),
        ("hires", 128, 4, "agentsd-r0.4"),
    ]
    assert all(r["unit"] == "s/image" and r["peak_mib_per_image"] > 0 for r in results)
    notes = {r["method"]: r["note"] for r in results}
    assert "runs the ToMe phase only" in notes.pop("agentsd-r0.4") and set(notes.values()) == {None}
    assert "hires pass" in capsys.readouterr().out


def test_hires_pass_runs_half_its_steps_and_warms_up_on_few(speed):
    assert speed.hires_steps(20) == (20, 10)
    assert speed.hires_steps(20, warmup=True) == (6, 3)  # just enough steps to run WARMUP_STEPS
    assert speed.hires_steps(4, warmup=True) == (4, 2)


def test_hires_suite_and_flags(speed, capsys):
    args = speed.parse_args(["--suite", "hires"])
    (run,) = args.runs
    assert (run.arch, run.modes, run.resolutions, run.steps) == ("sd15", ("hires",), (1024,), 20)
    assert [method.name for method in args.methods] == ["sd", "tomesd", "todo", "agentsd"]
    for flags in (["--steps", "1"], ["--resolutions", "192"]):
        with pytest.raises(SystemExit):
            speed.parse_args(["--arch", "tiny", "--mode", "hires", *flags])
    err = capsys.readouterr().err
    assert "argument --steps: the hires pass runs int(steps * 0.5) steps" in err
    assert "argument --resolutions: the hires pass needs multiples of 128 px" in err
