"""Tests of eval/speed.py's parts, one module at a time: suites, settings, flag types, workloads,
estimates, measuring, timing, the shared command-line bits and the report rows.

Deterministic and fast: no whole run, no timing asserted; the loads and seconds are given.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import estimate  # noqa: E402
import flag_types  # noqa: E402
import measure  # noqa: E402
import shared  # noqa: E402
import speed_report  # noqa: E402
import suites  # noqa: E402
import timing  # noqa: E402
import transformer_configs  # noqa: E402
import workloads  # noqa: E402
from methods import METHODS, Method, Variant  # noqa: E402
from settings import PlannedRun, SpeedSettings  # noqa: E402
from transformer_configs import TRANSFORMER_ARCHS  # noqa: E402
from unet_configs import ARCHS  # noqa: E402

CPU = torch.device("cpu")
EVAL = Path(__file__).resolve().parents[1] / "eval"


# --- the modules ----------------------------------------------------------------------------------


def eval_imports() -> dict[str, set[str]]:
    """Which of eval/'s modules each one imports (those under ``TYPE_CHECKING`` included)."""
    modules = {path.stem: path for path in EVAL.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        nodes = ast.walk(ast.parse(path.read_text()))
        imported = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        nodes = ast.walk(ast.parse(path.read_text()))
        imported |= {node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_eval_modules_import_each_other_without_a_cycle():
    """Each module can be read, and imported, after the ones it needs: no import circle."""
    graph, done, path = eval_imports(), set(), []

    def visit(name: str) -> None:
        assert name not in path, f"import cycle: {' -> '.join([*path[path.index(name) :], name])}"
        if name not in done:
            path.append(name)
            for module in sorted(graph[name]):
                visit(module)
            path.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)


# --- suites ---------------------------------------------------------------------------------------


def test_highres_and_gpu_suites_plan_their_tables():
    """highres: SD 1.5 at 1024/1536/2048 px with tomesd, ToDo, AgentSD's phases and the ceiling;
    SDXL at 1024/2048 px without tomesd and the ToMe phase. gpu: 2048 px and ToDo added, fewer
    repeats; gpu-compile: the whole UNet with CUDA graphs, torch.compile's mode passed through."""
    highres = suites.SUITES["highres"]
    assert highres.settings["methods"] == ["sd", "tomesd", "todo", "agent-phase", "tome-phase", "ceiling"]
    sizes = {(run.arch, px) for run in highres.runs for px in run.resolutions}
    assert sizes == {("sd15", 1024), ("sd15", 1536), ("sd15", 2048), ("sdxl", 1024), ("sdxl", 2048)}
    assert all(run.modes == ("unet",) and run.compile == "none" for run in highres.runs)
    assert all(set(run.skip) == {"tomesd", "tome-phase"} for run in highres.runs if run.arch == "sdxl")
    gpu = suites.SUITES["gpu"]
    assert "todo" in gpu.settings["methods"]
    assert ("sd15", 2048) in {(run.arch, px) for run in gpu.runs for px in run.resolutions}
    gpu_compile = suites.SUITES["gpu-compile"]
    assert gpu_compile.settings["compiler_mode"] == "reduce-overhead"
    assert [(run.modes, run.resolutions, run.compile) for run in gpu_compile.runs] == [
        (("unet",), (512, 1024), "none"),  # the same session's eager baseline first: seconds, written at once
        (("pipeline",), (1024, 512), "full"),  # whole generations: the recipe's two graphs, both phases
    ]
    runs = [{m for m in gpu_compile.settings["methods"] if m not in run.skip} for run in gpu_compile.runs]
    assert runs == [{"sd", "todo", "agent-phase"}, {"sd", "todo", "agentsd"}]


def test_dit_suites_time_each_transformer_at_1024_and_2048_px():
    """dit (CPU) and gpu-dit (one GPU, fp16): the three transformers, cheapest first, one forward each at
    1024 and 2048 px with sd, ToDo, AgentSD's two phases and the ceiling."""
    for name in ("dit", "gpu-dit"):
        suite = suites.SUITES[name]
        assert suite.settings["methods"] == ["sd", "todo", "agent-phase", "tome-phase", "ceiling"]
        assert [(run.arch, run.resolutions, run.modes) for run in suite.runs][:3] == [
            ("pixart-sigma", (1024,), ("unet",)),
            ("flux", (1024,), ("unet",)),
            ("sd35-medium", (1024,), ("unet",)),
        ]
        assert {run.arch: run.resolutions for run in suite.runs[3:]} == dict.fromkeys(
            ["pixart-sigma", "flux", "sd35-medium"], (2048,)
        )
    assert suites.SUITES["gpu-dit"].settings["dtype"] == "float16"


def test_gpu_smoke_is_the_gpu_plan_on_tiny_models():
    smoke, gpu = suites.SUITES["gpu-smoke"], suites.SUITES["gpu"]
    assert [(run.modes, run.compile, run.skip) for run in smoke.runs] == [
        (run.modes, run.compile, run.skip) for run in gpu.runs
    ]
    assert {run.arch for run in smoke.runs} == {"tiny", "tiny-xl"}
    assert all(run.resolutions == (64,) and run.steps == 2 for run in smoke.runs)


def test_a_planned_run_names_its_source():
    assert PlannedRun("sd15", None, ("unet",), (512,)).source == "sd15 (random weights)"
    assert PlannedRun(None, "some/model", ("unet",), (512,)).source == "some/model"


def test_pipeline_loop_methods_are_timed_in_whole_generations_only():
    plan = [Variant(METHODS["sd"]), Variant(METHODS["deepcache"])]
    assert suites.timed_in("pipeline", plan) == plan
    assert suites.timed_in("unet", plan) == suites.timed_in("hires", plan) == plan[:1]


# --- settings -------------------------------------------------------------------------------------


def test_a_run_with_its_own_calls_gets_its_own_settings():
    settings = SpeedSettings(warmup=3, repeats=10)
    run = PlannedRun("sd15", None, ("unet",), (2048,), repeats=5)
    assert (settings.for_run(run).warmup, settings.for_run(run).repeats) == (3, 5)
    assert settings.repeats == 10  # frozen: the suite's settings are left as they were
    assert settings.for_run(PlannedRun("sd15", None, ("unet",), (512,))) == settings


@pytest.mark.parametrize(
    "memory, compiler_mode, warmup, compile_mode, measured, extra",
    [
        (True, None, 1, "none", True, False),  # eager: in the last warm-up
        (True, None, 0, "none", True, True),  # no warm-up to measure in
        (True, None, 1, "full", True, True),  # a compiling warm-up's allocations are not the method's
        (True, "reduce-overhead", 1, "full", False, False),  # CUDA graphs allocate in their own pool
        (True, "reduce-overhead", 1, "none", True, False),
        (False, None, 1, "none", False, False),
    ],
)
def test_where_peak_memory_is_measured(memory, compiler_mode, warmup, compile_mode, measured, extra):
    settings = SpeedSettings(memory=memory, compiler_mode=compiler_mode, warmup=warmup)
    assert settings.measures_memory(compile_mode) is measured
    assert settings.extra_memory_call(compile_mode) is extra


def test_settings_name_their_torch_dtype():
    assert SpeedSettings(dtype="float16").torch_dtype is torch.float16
    assert set(shared.DTYPES) == {"float32", "float16", "bfloat16"}


# --- flag types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parse, text, expected",
    [
        (flag_types.resolution, "512", 512),
        (flag_types.ratio, "0.75", 0.75),
        (flag_types.timestep, "0", 0),
        (flag_types.int_at_least(2), "2", 2),
        (flag_types.device, "cpu", CPU),
    ],
)
def test_flag_types_accept(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (flag_types.resolution, "500", "multiple of 64"),
        (flag_types.resolution, "big", "expected an integer"),
        (flag_types.ratio, "0.8", "(0, 0.75]"),
        (flag_types.ratio, "x", "expected a number"),
        (flag_types.timestep, "1000", "[0, 999]"),
        (flag_types.int_at_least(1), "0", ">= 1"),
        (flag_types.device, "tpu", "expected cpu, cuda or cuda:N"),
    ],
)
def test_flag_types_refuse_with_what_they_expected(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse(text)


# --- shared command-line bits ---------------------------------------------------------------------


def test_the_help_formatter_shows_each_default_once():
    parser = argparse.ArgumentParser(formatter_class=shared.HelpFormatter, description="line one\nline two")
    parser.add_argument("--sizes", nargs="+", default=[1, 2], help="sizes")
    parser.add_argument("--said", default=3, help="said already (default: three)")
    parser.add_argument("--none", default=None, help="nothing to show")
    text = " ".join(parser.format_help().split())
    assert "sizes (default: 1 2)" in text
    assert "said already (default: three)" in text and "(default: 3)" not in text
    assert "(default: None)" not in text
    assert "line one\nline two" in parser.format_help()  # the description as written


def test_from_pretrained_dtype_keyword_follows_diffusers():
    import diffusers
    from packaging.version import Version

    expected = "dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype"
    assert shared.dtype_kwarg() == expected


# --- workloads ------------------------------------------------------------------------------------


def test_cost_model_counts_reference_forwards():
    sd15 = workloads.COST_MODELS["sd15"]
    assert sd15.units(512) == 1.0
    assert sd15.units(1024) == pytest.approx(0.8 * 4 + 0.2 * 16)
    assert sd15.units(2048) == pytest.approx(0.8 * 16 + 0.2 * 256)  # 64 forwards at 512 px: about 11 min here
    assert workloads.cost_model_for("tiny") is workloads.cost_model_for(None) is workloads.DEFAULT_COST


def test_forwards_of_a_call_and_the_hires_steps():
    assert workloads.call_forwards("unet", 50) == 1
    assert workloads.call_forwards("pipeline", 50) == 50
    assert workloads.call_forwards("pipeline", 50, warmup=True) == workloads.WARMUP_STEPS
    assert workloads.hires_steps(20) == (20, 10)  # strength 0.5: the schedule's last 10 of 20
    asked, run = workloads.hires_steps(20, warmup=True)
    assert run == workloads.WARMUP_STEPS and asked * workloads.HIRES_STRENGTH >= run
    assert workloads.call_forwards("hires", 20) == 10


def test_unet_workload_is_seeded_and_shaped_for_the_guided_batch():
    unet = ARCHS["tiny"].build_unet()
    seen = []

    def forward(sample, timestep, **cond):
        seen.append((sample.clone(), int(timestep), cond["encoder_hidden_states"].shape))

    workload = workloads.unet_workload(unet, 64, 8, batch=4, timestep=981)
    workload.call(forward, False)
    again = workloads.unet_workload(unet, 64, 8, batch=4, timestep=981)
    again.call(forward, True)
    (first, t, text), (second, _, _) = seen
    assert first.shape == (4, unet.config.in_channels, 8, 8) and t == 981 and text[0] == 4
    assert torch.equal(first, second)  # the same inputs for every method
    assert (workload.images, workload.unit) == (2, ("s/forward", 1))


def test_sdxl_conditioning_has_pooled_text_and_size_ids():
    unet = ARCHS["tiny-xl"].build_unet()
    cond = workloads.unet_conditioning(unet, 2, 64, torch.Generator().manual_seed(0))
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def test_transformer_configs_build_the_published_architectures():
    """Parameters of the full-size configs (on the meta device: no memory, no init): SD3.5 Medium 2.24 B,
    PixArt-Sigma 0.61 B, FLUX.1-dev 11.9 B with its 19 + 38 blocks; the reduced Flux keeps its width."""
    counts = {}
    for name, blocks in (("sd35-medium", None), ("pixart-sigma", None), ("flux", (19, 38)), ("flux", (1, 1))):
        model = TRANSFORMER_ARCHS[name].build("meta", flux_blocks=blocks or (1, 1))
        counts[name, blocks] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
        if name == "flux":
            assert model.inner_dim == 3072 and len(model.transformer_blocks) == (blocks or (1, 1))[0]
    assert counts == {
        ("sd35-medium", None): 2.24,
        ("pixart-sigma", None): 0.61,
        ("flux", (19, 38)): 11.9,
        ("flux", (1, 1)): 0.55,
    }


def test_transformer_inputs_are_what_each_pipeline_gives_one_forward():
    """At 1024 px, one image: SD3 and PixArt a guided pair of 128 x 128 latents with 77 + 256 / 300 text tokens
    (PixArt's with their mask), the timestep on the 1000 scale; Flux one row of 64 x 64 packed tokens with
    their (0, row, column) ids, 512 text tokens at zero ids, the timestep over 1000 and the guidance scale."""
    shapes = {}
    for name in ("tiny-sd3", "tiny-pixart", "tiny-flux"):
        arch = TRANSFORMER_ARCHS[name]
        workload = workloads.transformer_workload(arch.build(), arch, 1024, batch=2, timestep=981)
        inputs = workload.call(lambda **inputs: inputs, False)
        shapes[name] = {key: tuple(value.shape) for key, value in inputs.items() if torch.is_tensor(value)}
        assert (workload.images, workload.unit) == (1, ("s/forward", 1))
    assert shapes["tiny-sd3"] == {
        "hidden_states": (2, 16, 128, 128),
        "encoder_hidden_states": (2, 333, 4096),
        "pooled_projections": (2, 2048),
        "timestep": (2,),
    }
    assert shapes["tiny-pixart"] == {
        "hidden_states": (2, 4, 128, 128),
        "encoder_hidden_states": (2, 300, 4096),
        "encoder_attention_mask": (2, 300),
        "timestep": (2,),
    }
    assert shapes["tiny-flux"] == {
        "hidden_states": (1, 4096, 64),
        "encoder_hidden_states": (1, 512, 4096),
        "pooled_projections": (1, 768),
        "timestep": (1,),
        "img_ids": (4096, 3),
        "txt_ids": (512, 3),
        "guidance": (1,),
    }
    flux = TRANSFORMER_ARCHS["tiny-flux"]
    inputs = flux.inputs(flux.build(), 1, 1024, 981, torch.Generator())
    assert inputs["img_ids"][[0, 1, 64, -1]].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 63, 63]]
    assert not inputs["txt_ids"].any() and inputs["timestep"].tolist() == pytest.approx([0.981])
    assert inputs["guidance"].tolist() == [transformer_configs.FLUX_GUIDANCE]


# --- estimates ------------------------------------------------------------------------------------


def test_estimate_scales_the_first_call_by_the_cost_model(capsys):
    sd15 = workloads.COST_MODELS["sd15"]
    assert sd15.units(512) == 1.0
    est = estimate.Estimate("test", total=10.0, compilations=3)
    est.add(1.0)
    est.show(1.0, 2.0, compile_seconds=5.0, compiled=1)  # 9 units left at 2 s, two more methods to compile
    assert "about 28 s to go" in capsys.readouterr().err


def test_adapted_estimate_compares_the_first_call_with_the_a_priori_pace(capsys):
    est = estimate.Estimate("test", total=10.0, compilations=0, rate=1.0, later=100.0)
    est.add(1.0)
    est.show(1.0, 2.0)  # 9 units left at 2 s: twice the a-priori 1 s per unit
    err = capsys.readouterr().err
    assert "adapted estimate: about 18 s to go; 2.0x the a-priori time per forward (a slower or busier" in err
    assert "the later runs about 3 min 20 s at this pace" in err
    assert estimate.duration(5 * 3600 + 59) == "5 h 00 min"
    est.show(1.0, 100.0)
    assert capsys.readouterr().err == ""  # shown once


def test_planned_cost_counts_every_call_of_a_run():
    run = PlannedRun("sd15", None, ("unet",), (512, 1024))
    settings = SpeedSettings(warmup=1, repeats=2, memory=False)
    units = workloads.COST_MODELS["sd15"].units
    assert estimate.planned_cost(run, settings, {"unet": 3}) == pytest.approx(3 * 3 * (units(512) + units(1024)))
    compiled = PlannedRun("sd15", None, ("unet",), (512,), compile="full")
    with_memory = SpeedSettings(warmup=1, repeats=2, memory=True)  # compiled: one extra memory call
    assert estimate.planned_cost(compiled, with_memory, {"unet": 1}) == 4


def test_a_priori_rate_only_where_the_reference_applies(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    run = PlannedRun("sd15", None, ("unet",), (512,))
    assert estimate.a_priori_rate(run, SpeedSettings()) == pytest.approx(10.2 * 2)  # 2 reference threads on 1
    assert estimate.a_priori_rate(run, SpeedSettings(dtype="float16")) is None
    assert estimate.a_priori_rate(PlannedRun("tiny", None, ("unet",), (64,)), SpeedSettings()) is None


# --- measuring ------------------------------------------------------------------------------------


def _progress(shown: list[str]) -> argparse.Namespace:
    return argparse.Namespace(set_postfix_str=shown.append, update=lambda: None)


def test_variants_run_on_twins_in_alternating_order_and_the_estimate_is_shown_once(capsys):
    """Each variant gets its own twin of the model, kept for all its calls, so that the timed calls
    can go round the variants (forward, then backward) whether or not they are compiled."""
    plan = [Variant(Method(name, name, name, uses_ratio=False)) for name in "abc"]
    shown: list[str] = []
    models: list[object] = []
    workload = workloads.Workload("unet", 64, 1, 1, lambda generate, warmup: models.append(generate))
    settings = SpeedSettings(warmup=1, repeats=3, memory=False, device=CPU)
    est = estimate.Estimate("test", total=12 * workload.cost(), compilations=0)
    target = torch.nn.Linear(2, 2)
    results = measure.measure(workload, target, plan, settings, "none", _progress(shown), est)

    timed = [line.split()[2] for line in shown if "repeat" in line]
    assert timed == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert all(len(result.seconds) == 3 for result in results.values())
    assert capsys.readouterr().err.count("to go") == 1
    called = [line.split()[2] for line in shown]  # warm-ups, then the timed calls
    twins = {name: {id(model) for n, model in zip(called, models) if n == name} for name in "abc"}
    assert all(len(ids) == 1 for ids in twins.values()) and len(set.union(*twins.values())) == 3
    assert id(target) not in set.union(*twins.values())
    assert all(model.weight is target.weight for model in models)  # new modules, the same weights


def test_memory_is_measured_in_the_last_warm_up_and_loads_after_timed_calls(monkeypatch):
    monkeypatch.setattr(timing, "machine_load", lambda: 1.5)
    monkeypatch.setattr(timing, "peak_memory", lambda call, device: call() and 1024)
    plan = [Variant(Method("a", "a", "a", uses_ratio=False))]
    shown: list[str] = []
    workload = workloads.Workload("unet", 64, 1, 1, lambda generate, warmup: None)
    settings = SpeedSettings(warmup=2, repeats=2, memory=True, device=CPU)
    est = estimate.Estimate("test", total=4 * workload.cost(), compilations=0)
    (result,) = measure.measure(workload, torch.nn.Linear(2, 2), plan, settings, "none", _progress(shown), est).values()
    assert shown == [
        "unet 64px a warm-up",
        "unet 64px a warm-up + memory",
        "unet 64px a repeat 1/2",
        "unet 64px a repeat 2/2",
    ]
    assert result.peak_bytes == 1024 and result.loads == [1.5, 1.5] and result.compiles is None


def test_a_variant_that_fails_fullgraph_is_compiled_again_with_graph_breaks(monkeypatch):
    """The retry: compiled, ``fullgraph=True`` first; on a dynamo refusal once more without it, noted."""
    tried = []

    def compile_target(model, mode, options):
        tried.append(options["fullgraph"])

    def call(generate, warmup):
        if tried[-1]:
            raise torch._dynamo.exc.Unsupported("a graph break")

    monkeypatch.setattr(measure, "compile_target", compile_target)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    plan = [Variant(Method("a", "a", "a", uses_ratio=False))]
    workload = workloads.Workload("unet", 64, 1, 1, call)
    settings = SpeedSettings(warmup=1, repeats=1, memory=False, device=CPU, compile_backend="eager")
    est = estimate.Estimate("test", total=2 * workload.cost(), compilations=1)
    (result,) = measure.measure(
        workload, torch.nn.Linear(2, 2), plan, settings, "regional", _progress([]), est
    ).values()
    assert tried == [True, False]
    assert result.note.startswith("fullgraph=True failed (a graph break")
    assert result.compiles == 0 and len(result.seconds) == 1


def test_twin_of_a_pipeline_shares_every_weight():
    pipe = ARCHS["tiny"].build_pipeline()
    copy = measure.twin(pipe)
    assert copy is not pipe and copy.unet is not pipe.unet and copy.scheduler is not pipe.scheduler
    for name in ("unet", "vae", "text_encoder"):
        original, twin = getattr(pipe, name), getattr(copy, name)
        assert all(a is b for a, b in zip(original.parameters(), twin.parameters(), strict=True))


def test_compile_target_passes_torch_compiles_options_through():
    seen = {}
    unet = torch.nn.Linear(2, 2)
    unet.compile = lambda **options: seen.update(options)
    measure.compile_target(
        unet, "full", measure.compile_options("inductor", fullgraph=False, compiler_mode="reduce-overhead")
    )
    assert seen == {"fullgraph": False, "dynamic": False, "backend": "inductor", "mode": "reduce-overhead"}


def test_rows_name_what_compiled_each_method():
    assert measure.compiled_with(METHODS["sd"], "none") is None
    assert measure.compiled_with(METHODS["agentsd"], "regional") == "compile_repeated_blocks"
    assert measure.compiled_with(METHODS["sd"], "full") == "torch.compile"
    assert measure.compiled_with(METHODS["agent-phase"], "full") == "agentsd.compile_unet"


# --- timing ---------------------------------------------------------------------------------------


def test_timed_measures_the_call():
    ticks = []
    assert timing.timed(lambda: ticks.append(1), CPU) >= 0 and ticks == [1]
    timing.synchronize(CPU)  # nothing queued on a CPU


def test_peak_memory_sees_a_tensor_allocated_in_the_call():
    assert timing.peak_memory(lambda: torch.empty(2**20, dtype=torch.uint8), CPU) >= 2**20


def test_a_busy_machine_is_warned_once_with_the_scripts_name(monkeypatch, capsys):
    """Deterministic: the load readings are given. Two CPUs: a load average of 2 is this run's own
    two threads, above it other work competed."""
    monkeypatch.setattr(timing, "CPUS", 2)
    for load, busy in ((None, False), (2.0, False), (2.5, False), (3.4, True)):
        monkeypatch.setattr(timing, "machine_load", lambda load=load: load)
        assert timing.warn_if_busy("example", "before timing") is busy
        assert timing.busy(load, 2) is busy
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1
    assert "example: WARNING: load average 3.4 on 2 CPUs before timing: other work is running" in err


# --- report rows ----------------------------------------------------------------------------------


def _row(method: str, seconds: list[float], load: float | None = None):
    """A result row as rows_for makes it, from the timed seconds of one method on one workload."""
    result = measure.Measurement(seconds=seconds, loads=[] if load is None else [load])
    return Variant(METHODS[method]), result


def test_rows_say_how_far_each_method_gets_towards_the_ceiling():
    workload = workloads.Workload("unet", 2048, 1, 1, lambda generate, warmup: None)
    run = PlannedRun("sd15", None, ("unet",), (2048,))
    results = dict(_row(name, [s]) for name, s in (("sd", 10.0), ("agent-phase", 4.0), ("ceiling", 2.0)))
    rows = {row.method: row for row in speed_report.rows_for(run, workload, results, "sd")}
    assert {name: row.ceiling_speedup for name, row in rows.items()} == {"sd": 5.0, "agent-phase": 5.0, "ceiling": 5.0}
    assert [rows[name].of_the_way for name in ("sd", "agent-phase", "ceiling")] == [0.0, 0.75, 1.0]
    assert "75% of 5.00x" in speed_report.format_table(list(rows.values()))


def test_noise_warnings_name_a_busy_machine_and_repeats_that_disagree():
    """Deterministic: the load readings are given. Two CPUs: a load average of 2 is this run's own
    two threads, above it other work competed; repeats spreading over 10% are named with their spread."""
    noise_warnings = speed_report.noise_warnings
    workload = workloads.Workload("unet", 512, 1, 1, lambda generate, warmup: None)
    run = PlannedRun("sd15", None, ("unet",), (512,))

    def rows(tome_seconds: list[float], load: float | None):
        results = dict([_row("sd", [10.0, 10.2], load), _row("tome-phase", tome_seconds, load)])
        return speed_report.rows_for(run, workload, results, "sd")

    assert noise_warnings(rows([6.0, 6.3], 2.0), cpus=2) == []
    assert noise_warnings(rows([6.0, 6.3], None), cpus=2) == []  # no load average on this OS: nothing to say
    (busy,) = noise_warnings(rows([6.0, 6.3], 3.4), cpus=2)
    assert "load average up to 3.4 on 2 CPUs while timing every table" in busy
    (spread,) = noise_warnings(rows([6.0, 10.4], 1.0), cpus=2)  # ToMe phase 1.67x, then 0.98x
    assert "tome-phase at 512 px 54%" in spread and "sd at" not in spread
    assert noise_warnings(rows([6.0], 1.0), cpus=2) == []  # one timed call: no spread to judge


def test_compiled_tables_say_what_compiled_each_row():
    workload = workloads.Workload("unet", 512, 1, 1, lambda generate, warmup: None)
    run = PlannedRun("sd15", None, ("unet",), (512,), compile="full")
    results = dict([_row("sd", [10.0]), _row("agentsd", [6.0])])
    rows = speed_report.rows_for(run, workload, results, "sd")
    assert [(row.compile, row.compiled_with) for row in rows] == [
        ("full", "torch.compile"),
        ("full", "agentsd.compile_unet"),
    ]
    table = speed_report.format_table(rows)
    assert "compiled with" in table and "agentsd.compile_unet" in table
