"""Smoke test of the speed benchmark (eval/speed.py): it runs on tiny models and writes its outputs.

Timings are never asserted: they are meaningless on tiny models and on a shared test machine.
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = ["sd", "tomesd", "agentsd", "agent-phase", "tome-phase"]
VARIANTS = ["sd", "tomesd-r0.4", "agentsd-r0.4", "agent-phase-r0.4", "tome-phase-r0.4"]


@pytest.fixture
def speed(monkeypatch):
    """The benchmark module (a script in eval/, next to the configs it imports)."""
    monkeypatch.syspath_prepend(str(ROOT / "eval"))
    threads = torch.get_num_threads()
    yield importlib.import_module("speed")
    torch.set_num_threads(threads)  # --threads changes a process-wide setting


def check_outputs(out: Path, modes: list[str], resolutions: list[int]) -> list[dict]:
    report = json.loads((out / "speed.json").read_text())
    results = report["results"]
    expected = {(m, px, v) for m in modes for px in resolutions for v in VARIANTS}
    assert {(r["mode"], r["resolution"], r["method"]) for r in results} == expected
    for row in results:
        assert len(row["seconds"]) == 1 and row["median_s"] > 0
        assert row["peak_mib_per_image"] > 0
        if row["method"] == "sd":
            assert row["speedup"] == 1.0 and row["memory_vs_sd"] == 1.0
    assert report["meta"]["command"].startswith("python eval/speed.py")

    with (out / "speed.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(expected)
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    return results


def test_random_arch_both_modes(speed, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--arch",
        "tiny",
        "--mode",
        "both",
        "--resolutions",
        "64",
        "--methods",
        *ALL_METHODS,
        "--steps",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    rows = speed.main(argv)

    results = check_outputs(out, ["unet", "pipeline"], [64])
    assert len(rows) == len(results)
    assert {r["unit"] for r in results} == {"s/forward", "s/image"}
    table = capsys.readouterr().out
    assert "agent-phase-r0.4" in table and "speed-up" in table


def test_real_sdxl_pipeline(speed, tmp_path):
    """--model loads a saved pipeline; SDXL needs added conditioning and tomesd one level down."""
    model = save_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    out = tmp_path / "out"
    argv = [
        "--model",
        str(model),
        "--mode",
        "both",
        "--resolutions",
        "64",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    speed.main(argv)
    check_outputs(out, ["unet", "pipeline"], [64])


def test_tomesd_patches_the_top_attention_level(speed):
    from unet_configs import ARCHS

    found = {name: speed.top_attention_downsample(arch.unet["down_block_types"]) for name, arch in ARCHS.items()}
    assert found == {"sd15": 1, "sd21": 1, "sdxl": 2, "tiny": 1, "tiny-xl": 2}


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--batch", "3"], "--batch"),
        (["--resolutions", "500"], "--resolutions"),
        (["--repeats", "many"], "--repeats"),
        (["--ratios", "0.9"], "--ratios"),
        (["--methods", "tomesd", "agentsd"], "--methods"),
        (["--methods", "fast"], "--methods"),
        (["--arch", "sd14"], "--arch"),
        (["--arch", "sd15", "--model", "some/model"], "--model"),
        (["--compile", "--warmup", "0"], "--warmup"),
        (["--timestep", "1000"], "--timestep"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_flags_fail_before_any_work(speed, tmp_path, capsys, flags, flag):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        speed.main([*flags, "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not out.exists()


def test_unloadable_model_names_the_flag(speed, tmp_path):
    with pytest.raises(SystemExit, match="argument --model: cannot load"):
        speed.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
