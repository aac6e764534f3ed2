"""eval/fid.py on diffusion transformer pipelines, offline: tiny SD3 (two CLIPs, no T5), Flux (CLIP and
T5, guidance-distilled) and PixArt-Sigma (T5) saved to disk and loaded by ``from_pretrained(folder)``,
each run end to end with the same protocol (SD, AgentSD's ToMe phase, AgentSD); the refusals that a
transformer model brings (tomesd, a scheduler that cannot drive flow matching), before anything runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import tiny_dit
from accelerate import PartialState
from PIL import Image
from test_fid_math import TinyExtractor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import fid  # noqa: E402

# Each pipeline's own scheduler, which fid.py runs by default on a transformer model.
OWN_SCHEDULER = {
    "sd3": "FlowMatchEulerDiscreteScheduler",
    "flux": "FlowMatchEulerDiscreteScheduler",
    "pixart-sigma": "DPMSolverMultistepScheduler",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A folder per tiny pipeline: the three transformers with text encoders, and SD 1.5-shaped ``sd``."""
    root = tmp_path_factory.mktemp("tiny-models")
    folders = {kind: tiny_dit.save_tiny_text_pipeline(root / kind, kind) for kind in tiny_dit.TEXT_PIPELINES}
    folders["sd"] = tiny.save_tiny_pipeline(root / "sd")
    return {kind: str(folder) for kind, folder in folders.items()}


def argv(model, out, *extra):
    """Two 32-px images in one batch, two steps, no CLIP score or LPIPS; the protocol's other defaults."""
    small = ["--num-images", "2", "--batch-size", "2", "--steps", "2", "--size", "32", "--ratio", "0.4"]
    return ["--model", model, "--out", str(out), *small, "--workers", "0", "--no-clip", "--no-lpips", *extra]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.parametrize("kind", tiny_dit.TEXT_PIPELINES)
def test_a_transformer_model_runs_sd_tome_phase_and_agentsd_with_its_own_scheduler(models, kind, tmp_path):
    out = tmp_path / "out"
    rows = fid.main(argv(models[kind], out), feature_extractor=TinyExtractor())
    assert [r["label"] for r in rows] == ["SD", "AgentSD ToMe phase r=0.4", "AgentSD r=0.4"]
    for r in rows:
        assert r["images"] == 2 and r["sec_per_image"] > 0
        assert r["paper_fid"] is None and r["paper_sec_per_image"] is None  # SD v1.5's, not this model's
        assert (r["fid_vs_sd"] is None) == (r["method"] == "sd") and r["fid"] is None  # no --reference
    folders = {name: out / "images" / name for name in ("sd", "tome-phase-r0.4", "agentsd-r0.4")}
    for folder in folders.values():
        assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]
        assert pixels(folder / "00000.png").shape == (32, 32, 3)
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["scheduler"] == OWN_SCHEDULER[kind]  # the scheduler that made the pixels
    for name in ("tome-phase-r0.4", "agentsd-r0.4"):
        for i in range(2):
            assert (pixels(folders[name] / f"0000{i}.png") != pixels(folders["sd"] / f"0000{i}.png")).any(), name
    table = (out / "results.md").read_text()
    assert f"2 steps of {OWN_SCHEDULER[kind]}" in table and "paper:" not in table
    assert "| AgentSD ToMe phase r=0.4 |" in table
    assert json.loads((out / "results.json").read_text())["settings"]["scheduler"] == OWN_SCHEDULER[kind]


def checked(model, tmp_path, *extra):
    parser = fid.build_parser()
    args = parser.parse_args(["--model", model, "--out", str(tmp_path), "--device", "cpu", *extra])
    fid.check_args(parser, args, PartialState())
    return args


def test_the_model_index_decides_the_default_methods_and_scheduler(models, tmp_path):
    """Read from model_index.json before any weight: a UNet keeps the paper's protocol, a transformer
    gets AgentSD's ToMe phase for ToMeSD and its own scheduler; an explicit choice that fits is kept."""
    for kind, methods, scheduler, used in [
        ("sd", ["sd", "tomesd", "agentsd"], "pndm", "PNDMScheduler"),
        ("sd3", ["sd", "tome-phase", "agentsd"], "own", "FlowMatchEulerDiscreteScheduler"),
        ("pixart-sigma", ["sd", "tome-phase", "agentsd"], "own", "DPMSolverMultistepScheduler"),
    ]:
        args = checked(models[kind], tmp_path)
        assert [m.name for m in args.methods] == methods, kind
        assert (args.scheduler, args.scheduler_class, fid.protocol(args)["scheduler"]) == (scheduler, used, used)
    pixart = checked(models["pixart-sigma"], tmp_path, "--scheduler", "pndm", "--methods", "sd", "agent-phase,todo")
    assert pixart.scheduler_class == "PNDMScheduler"  # PixArt predicts noise: a DDPM-family sampler drives it
    assert [m.name for m in pixart.methods] == ["sd", "agent-phase", "todo"]
    assert checked(models["sd"], tmp_path, "--scheduler", "own").scheduler_class == "PNDMScheduler"
    sd3, sd = fid.read_pipeline_index(models["sd3"]), fid.read_pipeline_index(models["sd"])
    assert sd3.transformer and sd3.flow_matching and not sd3.safety_checker
    assert set(sd3.absent) >= {"text_encoder_3", "tokenizer_3"}  # loaded as None, as SD3 without T5 asks
    assert not sd.transformer and sd.safety_checker


@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("sd3", ["--methods", "sd", "tomesd"], "--methods: tomesd patches UNets only"),
        ("flux", ["--methods", "agentsd,deepcache,tgate"], "--methods: deepcache, tgate patch UNets only"),
        ("pixart-sigma", ["--methods", "tomesd"], "choose from sd, agentsd, agent-phase, tome-phase, todo"),
        ("flux", ["--scheduler", "pndm"], "--scheduler: pndm cannot drive"),
        ("sd3", ["--scheduler", "dpm"], "flow-matching model (StableDiffusion3Pipeline, scheduler "),
        ("sd3", ["--scheduler", "euler"], "use --scheduler own"),
        ("sd3", ["--scheduler", "nope"], "choose from own, pndm"),
    ],
)
def test_what_a_transformer_model_cannot_take_is_refused_before_anything_runs(
    models, kind, extra, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(fid, "load_pipeline", lambda args: pytest.fail("loaded the model despite bad input"))
    with pytest.raises(SystemExit) as exit_:
        fid.main(argv(models[kind], tmp_path / "out", *extra), feature_extractor=TinyExtractor())
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, not even the output folder


def test_an_unreadable_model_is_refused_naming_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_pipeline", lambda args: pytest.fail("loaded the model despite bad input"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        fid.main(argv(str(tmp_path / "empty"), tmp_path / "out"), feature_extractor=TinyExtractor())
    assert "--model: cannot read the model_index.json of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_readme_commands_for_the_transformers_pass_the_checks(tmp_path, monkeypatch):
    """The README's one command per model: valid flags, the transformer defaults, each model's own scheduler
    (the model_index.json of each hub id, as published, stood in for offline)."""
    published = {
        "stabilityai/stable-diffusion-3.5-medium": ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler"),
        "black-forest-labs/FLUX.1-dev": ("FluxPipeline", "FlowMatchEulerDiscreteScheduler"),
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": ("PixArtSigmaPipeline", "DPMSolverMultistepScheduler"),
    }
    index = {model: fid.PipelineIndex(name, True, scheduler) for model, (name, scheduler) in published.items()}
    monkeypatch.setattr(fid, "read_pipeline_index", index.__getitem__)
    monkeypatch.chdir(tmp_path)
    readme = (ROOT / "README.md").read_text()
    commands = [line.split()[2:] for line in readme.splitlines() if line.startswith("python eval/fid.py --model ")]
    assert [c[1] for c in commands] == list(published)
    for command in commands:
        parser = fid.build_parser()
        args = parser.parse_args(command)
        fid.check_args(parser, args, PartialState())
        assert [m.name for m in args.methods] == ["sd", "tome-phase", "agentsd"] and args.ratios == [0.4]
        assert args.scheduler_class == published[args.model][1] and args.width == args.height == 1024
