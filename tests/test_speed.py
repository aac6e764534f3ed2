"""Tests of the speed benchmark (eval/speed.py) on tiny models: outputs, flags, compile modes, suites.

Timings are never asserted: they are meaningless on tiny models and on a shared test machine.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def eval_modules(monkeypatch):
    """eval/ on sys.path, as when its scripts run."""
    monkeypatch.syspath_prepend(str(ROOT / "eval"))


@pytest.fixture
def speed():
    """The benchmark module (a script in eval/, next to the modules it imports)."""
    threads = torch.get_num_threads()
    yield importlib.import_module("speed")
    torch.set_num_threads(threads)  # --threads changes a process-wide setting


def refusal(script: str, argv: list[str], monkeypatch, capsys) -> str:
    """What ``python <script> <argv>`` prints when it refuses its flags (exit status 2), run in this
    process: the refusal comes before any work, and a fresh interpreter would only add its imports."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    # As for a script: its folder first on the path (restored after, with what the script adds).
    monkeypatch.setattr(sys, "path", [str((ROOT / script).parent), *sys.path])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stopped.value.code == 2
    return capsys.readouterr().err


def check_outputs(out: Path, expected: set[tuple[str, int, str]]) -> list[dict]:
    """speed.json/csv/png hold one row per (mode, px, variant) expected, each complete."""
    report = json.loads((out / "speed.json").read_text())
    results = report["results"]
    assert {(r["mode"], r["resolution"], r["method"]) for r in results} == expected
    for row in results:
        assert len(row["seconds"]) >= 1 and row["median_s"] > 0
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        if row["method"] == row["baseline"]:
            assert row["speedup"] == 1.0
    assert report["meta"]["command"].startswith("python eval/speed.py")
    with (out / "speed.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(expected)
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    return results


def test_script_every_method_both_modes_estimate_and_clean_output(tmp_path):
    """As a user runs it, on the SDXL-like pipeline built around the UNet: ``--methods all`` times
    every registered method that runs there (the pipeline-loop ones in pipeline mode only; CA-ToMe,
    SD-pipeline only, left out with a note), prints an estimate of the run's length before the first
    timed call, and no kineto ``USDT`` lines from the memory calls."""
    from methods import METHODS, variants

    out = tmp_path / "out"
    argv = ["--arch", "tiny-xl", "--mode", "both", "--resolutions", "64", "--methods", "all", "--steps", "2"]
    argv += ["--repeats", "1", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("KINETO_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "eval/speed.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # CA-ToMe refuses the SDXL pipeline; HiDiffusion a pipeline without name_or_path (where it imports at all).
    here = [method for method in METHODS.values() if method.unavailable() is None]
    names = [v.name for v in variants(here, [0.4]) if v.method.name not in ("ca-tome", "hidiffusion")]
    in_unet = [v.name for v in variants(here, [0.4]) if not v.method.needs_pipeline]
    expected = {("pipeline", 64, name) for name in names} | {("unet", 64, name) for name in in_unet}
    results = check_outputs(out, expected)
    assert all(row["peak_mib_per_image"] > 0 for row in results)
    # Installed, CA-ToMe is tried on the pipeline and refused there; missing, it is left out before any model.
    missing = METHODS["ca-tome"].unavailable()
    left_out = f"leaves out ca-tome: {missing}" if missing else "leaves out ca-tome on tiny-xl (random weights)"
    assert left_out in done.stderr
    assert "USDT" not in done.stdout + done.stderr
    assert "no a-priori estimate" in done.stdout  # tiny models have no reference forward
    assert "adapted estimate: about" in done.stderr
    assert done.stderr.index("to go") < done.stderr.index("repeat 1/1")
    assert "whole generation" in done.stdout and "agentsd+deepcache-r0.4" in done.stdout


def test_a_method_named_that_cannot_run_on_the_pipeline_stops_before_timing(speed, tmp_path, capsys):
    """CA-ToMe named on an SDXL pipeline stops the run before any timed call: installed, when it is
    tried on the pipeline (SD pipelines only); not installed, at the flags, saying how to install it."""
    from methods import METHODS

    argv = ["--arch", "tiny-xl", "--mode", "pipeline", "--methods", "sd", "ca-tome", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        speed.main(argv)
    if METHODS["ca-tome"].unavailable():
        assert exit_info.value.code == 2
        assert "argument --methods: method 'ca-tome' cannot run here: " in capsys.readouterr().err
    else:
        assert "argument --methods: ca-tome on tiny-xl" in str(exit_info.value)
        assert "StableDiffusionPipeline" in str(exit_info.value)
    assert not list(tmp_path.iterdir())


def test_real_sdxl_pipeline(speed, tmp_path):
    """--model loads a saved pipeline (SDXL: added conditioning, tomesd one level down); --baseline
    makes another method than sd the reference."""
    model = save_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    out = tmp_path / "out"
    argv = ["--model", str(model), "--mode", "pipeline", "--resolutions", "64", "--methods", "tomesd", "agent-phase"]
    argv += ["--baseline", "tomesd", "--steps", "2", "--repeats", "1", "--no-memory", "--threads", "1"]
    speed.main([*argv, "--out", str(out)])
    results = check_outputs(out, {("pipeline", 64, v) for v in ("tomesd-r0.4", "agent-phase-r0.4")})
    assert {row["baseline"] for row in results} == {"tomesd"}


def test_estimate_first_then_adapted_and_a_busy_machine_warned_on_a_tiny_model(speed, tmp_path, monkeypatch, capsys):
    """The a-priori estimate comes with the plan, before any model is built; after the first call
    the adapted one says how far the machine is from the reference pace; a load above the CPU count
    is warned before timing and beside the table."""
    import timing
    import workloads

    monkeypatch.setitem(workloads.COST_MODELS, "tiny", workloads.CostModel(64, 0.2, seconds=1e-6))
    monkeypatch.setattr(timing, "machine_load", lambda: 5.0)
    monkeypatch.setattr(timing, "CPUS", 2)
    argv = ["--arch", "tiny", "--resolutions", "64", "--methods", "sd", "tome-phase", "--repeats", "2"]
    rows = speed.main([*argv, "--threads", "1", "--no-memory", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "tiny (random weights): unet, 64 px, compile none, about 0 s a priori" in out
    assert "speed: estimate a priori: about 0 s on a quiet 2-core CPU" in out
    assert out.index("estimate a priori") < out.index("one forward, eager")  # first, then the table
    assert "WARNING: load average 5.0 on 2 CPUs before the first run" in err
    assert "adapted estimate: about" in err and "the a-priori time per forward (a slower or busier machine" in err
    assert "WARNING: load average up to 5.0 on 2 CPUs while timing every table" in out
    assert [row.load for row in rows] == [5.0, 5.0]


def test_whole_model_compile(speed, tmp_path):
    """A bare --compile is torch.compile(unet, fullgraph=True), or AgentSD's own compile_unet; a method
    that cannot compile whole (tomesd) is compiled again with graph breaks, and says so. No method
    recompiles in its timed calls: in particular the baseline is not served the split graphs that
    tomesd's breaks leave in the UNet's frames (each variant runs on a fresh dynamo cache)."""
    argv = ["--arch", "tiny", "--compile", "--compile-backend", "eager", "--methods", "sd", "tomesd", "agentsd"]
    argv += ["--resolutions", "64", "--repeats", "1", "--no-memory", "--threads", "1", "--out", str(tmp_path)]
    rows = speed.main(argv)
    assert [(row.method, row.compile, row.compiles) for row in rows] == [
        ("sd", "full", 0),
        ("tomesd-r0.4", "full", 0),
        ("agentsd-r0.4", "full", 0),
    ]
    assert rows[0].note is None and rows[2].note is None and rows[1].note.startswith("fullgraph=True failed")
    assert [rows[0].graph_breaks, rows[2].graph_breaks] == [0, 0]  # AgentSD: one graph for its phase


def test_agentsd_compiles_whole_with_its_own_compile_unet(speed, tmp_path, monkeypatch):
    """Whole-model, AgentSD's methods compile with agentsd.compile_unet once patched (no torch.cond: CUDA
    graphs capture it), the others with torch.compile of the UNet before they patch."""
    import agentsd

    compiled = []
    compile_unet = agentsd.compile_unet
    monkeypatch.setattr(
        agentsd, "compile_unet", lambda model, **options: compiled.append(options) or compile_unet(model, **options)
    )
    argv = ["--arch", "tiny", "--compile", "--compile-backend", "eager", "--methods", "sd", "agentsd"]
    argv += ["--resolutions", "64", "--repeats", "1", "--no-memory", "--threads", "1", "--out", str(tmp_path)]
    rows = speed.main(argv + ["--compiler-mode", "default"])
    assert compiled == [{"fullgraph": True, "dynamic": False, "backend": "eager", "mode": "default"}]
    assert [(row.method, row.graph_breaks, row.compiles) for row in rows] == [("sd", 0, 0), ("agentsd-r0.4", 0, 0)]


def test_whole_model_compile_writes_each_method_when_it_is_done(speed, tmp_path, monkeypatch):
    """Whole-model compiled, each method compiles alone (a minute each on a GPU): a run stopped while
    the third one compiles has already written the first two's rows."""
    import measure

    compile_options = measure.compile_options
    calls = []

    def stopped_at_the_third(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return compile_options(*args, **kwargs)

    monkeypatch.setattr(measure, "compile_options", stopped_at_the_third)
    argv = ["--arch", "tiny", "--compile", "--compile-backend", "eager", "--methods", "sd", "agent-phase", "todo"]
    argv += ["--resolutions", "64", "--repeats", "1", "--no-memory", "--threads", "1", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        speed.main(argv)
    results = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert [(r["method"], r["compile"]) for r in results] == [("sd", "full"), ("todo", "full")]  # the plan's order


def test_gpu_suite_plan_runs_on_tiny_models(speed, tmp_path):
    """--suite gpu-smoke: the gpu suite's runs (eager, pipeline, regional compilation; SD 1.5- and
    SDXL-like) on tiny models. Regional compilation tries fullgraph=True and says when a method
    needs graph breaks; no method recompiles in its timed calls."""
    out = tmp_path / "out"
    argv = ["--suite", "gpu-smoke", "--methods", "sd", "tomesd", "todo", "agent-phase", "ceiling", "--threads", "1"]
    speed.main([*argv, "--out", str(out)])
    results = json.loads((out / "speed.json").read_text())["results"]
    groups = {(r["source"], r["compile"], r["mode"]) for r in results}
    assert groups == {
        ("tiny (random weights)", "none", "unet"),
        ("tiny-xl (random weights)", "none", "unet"),
        ("tiny (random weights)", "none", "pipeline"),
        ("tiny (random weights)", "regional", "unet"),
        ("tiny-xl (random weights)", "regional", "unet"),
    }
    # Whole generations leave out AgentSD's single phases, forwards at t = 981 its recipe (the agent phase there).
    assert {r["method"] for r in results if r["mode"] == "pipeline"} == {"sd", "tomesd-r0.4", "todo", "ceiling"}
    # Five forward runs of five methods (2048 px is a run of its own: 64 px too here), one generation run of four.
    assert len(results) == 5 * 5 + 4 and all(r["peak_mib_per_image"] is not None for r in results)
    for row in (r for r in results if r["compile"] == "regional"):
        assert row["compiles"] == 0, row
        if row["method"] in ("sd", "todo", "ceiling"):
            assert row["note"] is None and row["graph_breaks"] == 0, row
        elif row["method"] == "tomesd-r0.4":  # tomesd creates a torch.Generator in every call
            assert "fullgraph=True failed" in row["note"]
        else:  # AgentSD's blocks compile whole: no fallback, no break
            assert row["note"] is None and row["graph_breaks"] == 0, row


def test_quick_suite_stays_a_two_minute_honest_comparison(speed):
    """The README's first command: SD against tomesd and both of AgentSD's phases (not the agent
    phase alone, its best case), in 12 forwards at 512 px (about 10 s each on 2 CPU cores)."""
    from workloads import COST_MODELS

    settings = speed.parse_args(["--suite", "quick"])
    (run,) = settings.runs
    assert (run.arch, run.modes, run.resolutions, run.compile) == ("sd15", ("unet",), (512,), "none")
    assert [m.name for m in settings.methods] == ["sd", "tomesd", "agent-phase", "tome-phase"]
    forwards = len(settings.methods) * (settings.warmup + settings.repeats + int(settings.memory))
    assert forwards * COST_MODELS["sd15"].units(512) <= 12
    assert settings.repeats >= 2  # a median and a spread


def test_flags_come_to_explicit_settings(speed, tmp_path):
    """parse_args checks the flags and returns one frozen record: runs, methods, defaults resolved."""
    argv = ["--arch", "tiny", "--mode", "both", "--resolutions", "64", "64", "128", "--ratios", "0.4", "0.4", "0.5"]
    settings = speed.parse_args([*argv, "--methods", "sd", "agentsd", "--device", "cpu", "--out", str(tmp_path)])
    (run,) = settings.runs
    assert (run.arch, run.modes, run.resolutions, run.compile) == ("tiny", ("unet", "pipeline"), (64, 128), "none")
    assert [m.name for m in settings.methods] == ["sd", "agentsd"] and not settings.every_method
    assert (settings.ratios, settings.dtype, settings.device.type) == ((0.4, 0.5), "float32", "cpu")
    assert settings.flags["dtype"] == "float32" and settings.flags["ratios"] == [0.4, 0.5]
    assert speed.parse_args(["--out", str(tmp_path)]).every_method  # --methods all


def test_a_suite_sets_the_defaults_and_flags_given_win(speed):
    settings = speed.parse_args(["--suite", "quick", "--repeats", "3"])
    assert (settings.suite, settings.warmup, settings.repeats, settings.memory) == ("quick", 1, 3, False)


def test_help_shows_every_default_once(speed):
    text = speed.build_parser().format_help()
    options = text.split("\n  -")
    for flag, default in [("-mode", "unet"), ("-resolutions", "512 768 1024"), ("-methods", "all")]:
        (block,) = [o for o in options if o.startswith(flag + " ")]
        assert f"(default: {default})" in " ".join(block.split())
    assert "(default: None)" not in text
    assert all(option.count("(default") <= 1 for option in options[1:])
    assert "sd15 when neither --arch nor --model" in " ".join(text.split())
    from suites import SUITES

    for suite in SUITES:
        assert f"  {suite}: " in text


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--batch", "3"], "--batch"),
        (["--resolutions", "500"], "--resolutions"),
        (["--repeats", "many"], "--repeats"),
        (["--ratios", "0.9"], "--ratios"),
        (["--methods", "tomesd", "agentsd"], "--baseline"),
        (["--baseline", "tomesd", "--methods", "sd"], "--baseline"),
        (["--methods", "fast"], "--methods"),
        (["--arch", "sd14"], "--arch"),
        (["--arch", "sd15", "--model", "some/model"], "--model"),
        (["--compile", "--warmup", "0"], "--warmup"),
        (["--compile", "fast"], "--compile"),
        (["--suite", "gpu", "--resolutions", "512"], "--suite"),
        (["--suite", "fastest"], "--suite"),
        (["--timestep", "1000"], "--timestep"),
        (["--device", "tpu"], "--device"),
        (["--arch", "flux", "--mode", "pipeline"], "--mode"),
        (["--arch", "tiny-sd3", "--compile"], "--compile"),
        (["--arch", "flux", "--flux-blocks", "0", "0"], "--flux-blocks"),
    ],
)
def test_bad_flags_fail_before_any_work(speed, tmp_path, capsys, flags, flag):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        speed.main([*flags, "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not out.exists()


def test_regional_compile_needs_a_recent_diffusers(speed, tmp_path, capsys, monkeypatch):
    from diffusers.models.modeling_utils import ModelMixin

    monkeypatch.delattr(ModelMixin, "compile_repeated_blocks")
    with pytest.raises(SystemExit):
        speed.main(["--arch", "tiny", "--compile", "regional", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "argument --compile: regional needs diffusers >= 0.35" in err
    assert not (tmp_path / "out").exists()


def test_pipeline_only_methods_are_refused_in_unet_mode(speed, tmp_path, capsys):
    from methods import METHODS

    loops = [name for name, method in METHODS.items() if method.needs_pipeline and not method.unavailable()]
    if not loops:
        pytest.skip("no installed method needs the pipeline's own loop")
    with pytest.raises(SystemExit):
        speed.main(["--arch", "tiny", "--mode", "unet", "--methods", "sd", loops[0], "--out", str(tmp_path / "o")])
    assert f"argument --methods: {loops[0]} run the pipeline's own loop" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unloadable_model_names_the_flag(speed, tmp_path):
    with pytest.raises(SystemExit, match="argument --model: cannot load"):
        speed.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_block_benchmark_times_a_knob_study_without_whole_forwards(monkeypatch, capsys):
    """benchmarks/block.py: registered methods and --agentsd knob variants on one block, its input
    captured from a UNet forward stopped at the block, with each call's longest operations
    (--profile); an unknown knob, a negative profile or a missing device is refused before any work."""
    command = [sys.executable, "benchmarks/block.py", "--arch", "tiny", "--resolution", "64", "--repeats", "1"]
    command += ["--threads", "1", "--modes", "eager", "--methods", "sd", "agent-phase", "ceiling"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*command, "--agentsd", "sx=2,sy=2,agent_ratio=0.95", "--profile", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ")[0].strip("| ") for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["method", "sd", "agent-phase", "ceiling", "agentsd[ratio=0.4,sx=2,sy=2,agent_ratio=0.95]"]
    profiles = re.findall(r"^(\S+), eager: \d+ ATen operations, [\d.]+ ms in all$", done.stdout, re.MULTILINE)
    assert profiles == rows[1:]
    bad_input = [(["--agentsd", "sx=2,speed=11"], "argument --agentsd"), (["--profile", "-1"], "argument --profile")]
    if not torch.cuda.is_available():
        bad_input.append((["--device", "cuda"], "argument --device: cuda is not available"))
    for bad, message in bad_input:
        assert message in refusal("benchmarks/block.py", [*command[2:], *bad], monkeypatch, capsys)


@pytest.mark.parametrize("arch", ["tiny-sd3", "tiny-pixart", "tiny-flux"])
def test_one_forward_of_each_diffusion_transformer(speed, tmp_path, capsys, arch):
    """--arch builds the transformer and times one forward on its pipeline's inputs (Flux: one row, no
    guidance pair), every method interleaved with its ratio to SDPA and to the ceiling, AgentSD's recipe and
    phases included; tomesd, which patches UNets only, is left out with the reason."""
    out = tmp_path / "out"
    argv = ["--arch", arch, "--resolutions", "64", "--methods", "all", "--repeats", "1", "--warmup", "0"]
    speed.main([*argv, "--no-memory", "--threads", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert f"leaves out tomesd-r0.4 on {arch} (random weights): tomesd patches a UNet's transformer blocks" in err
    rows = {row["method"]: row for row in json.loads((out / "speed.json").read_text())["results"]}
    assert set(rows) == {"sd", "todo", "ceiling", "agentsd-r0.4", "agent-phase-r0.4", "tome-phase-r0.4"}
    assert all(row["mode"] == "unet" and row["ceiling_speedup"] == rows["ceiling"]["speedup"] for row in rows.values())


def test_block_benchmark_times_flux_double_and_single_blocks(monkeypatch, capsys):
    """benchmarks/block.py --arch flux-like: each Flux block kind alone, on the input the plain model
    gives it (one row: Flux is guidance-distilled), run in this process."""
    argv = ["--arch", "tiny-flux", "--resolution", "64", "--repeats", "1", "--threads", "1", "--modes", "eager"]
    argv += ["--methods", "sd", "todo", "agent-phase", "tome-phase", "ceiling"]
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks"), *sys.path])
    for block in ("transformer_blocks.0", "single_transformer_blocks.0"):
        monkeypatch.setattr(sys, "argv", ["benchmarks/block.py", *argv, "--block", block])
        runpy.run_path(str(ROOT / "benchmarks" / "block.py"), run_name="__main__")
        out = capsys.readouterr().out
        assert f"tiny-flux `{block}` at 64 px, batch 1" in out
        rows = [line.split(" | ")[0].strip("| ") for line in out.splitlines() if line.startswith("| ")]
        assert rows == ["method", "sd", "todo", "agent-phase", "tome-phase", "ceiling"]
    message = "argument --block: 'blocks.9' is not a module of tiny-flux; e.g. transformer_blocks.0"
    assert message in refusal("benchmarks/block.py", [*argv, "--block", "blocks.9"], monkeypatch, capsys)


def test_forward_benchmark_times_knob_variants_of_the_whole_forward(monkeypatch, capsys):
    """benchmarks/forward.py: whole forwards of the unpatched UNet (--sd) and each --agentsd variant,
    interleaved, with the speed-up over the first; a bad knob or repeat count is refused before any work."""
    command = [sys.executable, "benchmarks/forward.py", "--arch", "tiny", "--resolution", "64", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*command, "--repeats", "2", "--sd", "--agentsd", "max_downsample=1", "max_downsample=2,sx=4,sy=4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")]
    labels = [row[0].strip("| ") for row in rows]
    assert labels == [
        "variant",
        "sd",
        "agentsd[ratio=0.4,max_downsample=1]",
        "agentsd[ratio=0.4,max_downsample=2,sx=4,sy=4]",
    ]
    assert rows[1][-1].strip("| ") == "1.00x"
    assert done.stdout.count("max_downsample=2,sx=4,sy=4]: ") == 2  # two interleaved rounds
    for bad, message in (
        (["--agentsd", "speed=11"], "argument --agentsd"),
        (["--repeats", "0", "--agentsd", "sx=2"], "--repeats"),
    ):
        assert message in refusal("benchmarks/forward.py", [*command[2:], *bad], monkeypatch, capsys)


def test_ops_benchmark_counts_what_each_method_adds_to_a_forward(monkeypatch, capsys):
    """benchmarks/ops.py: ATen operations of one forward per method, against the unpatched UNet's: the
    ceiling skips attention (fewer), AgentSD's merging adds some; a bad resolution is refused first."""
    command = [sys.executable, "benchmarks/ops.py", "--arch", "tiny", "--resolution", "64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*command, "--methods", "ceiling", "agent-phase"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert list(rows) == ["sd", "ceiling", "agent-phase"]
    assert rows["sd"][2] == "+0" and int(rows["ceiling"][2]) < 0 < int(rows["agent-phase"][2])
    assert int(rows["agent-phase"][1]) == int(rows["sd"][1]) + int(rows["agent-phase"][2])
    assert "argument --resolution" in refusal("benchmarks/ops.py", [*command[2:-1], "100"], monkeypatch, capsys)
