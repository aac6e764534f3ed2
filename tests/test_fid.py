"""eval/fid.py end to end, offline: a tiny pipeline saved to disk, a few images, an injected extractor."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from accelerate import PartialState
from PIL import Image
from test_fid_math import TinyExtractor
from test_fid_quality import save_tiny_clip, tiny_lpips

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import fid  # noqa: E402
import fid_metrics as fm  # noqa: E402
import methods as registry  # noqa: E402
import quality_metrics as qm  # noqa: E402
from atomic_write import atomic_path  # noqa: E402

# Every method of the registry that fid.py takes and that can run here.
NAMES = [n for n, m in registry.METHODS.items() if not m.timing_only and m.unavailable() is None]
METHODS = ",".join(NAMES)
FOLDERS = [v.name for v in registry.variants([registry.METHODS[n] for n in NAMES], [0.4])]
N_IMAGES, BATCH = 5, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD pipeline folder, with a tiny CLIP model beside it (``clip_of``) for the CLIP score."""
    folder = tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))
    save_tiny_clip(clip_of(folder))
    return str(folder)


def clip_of(model) -> Path:
    return Path(model).parent / "tiny-clip"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(40, 48, 3), (32, 32, 3), (50, 30, 3), (32, 32, 3), (36, 36, 3), (64, 40, 3)]):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"real_{i}.jpg")
    return str(folder)


@pytest.fixture(autouse=True)
def no_torchvision(monkeypatch):
    """LPIPS comes from the injected network or nowhere: never a download, whatever is installed."""
    monkeypatch.setattr(qm, "lpips_available", lambda: False)


def argv(model, out, *extra):
    return [
        "--model",
        model,
        "--out",
        str(out),
        "--num-images",
        str(N_IMAGES),
        "--batch-size",
        str(BATCH),
        "--steps",
        "2",
        "--size",
        "32",
        "--methods",
        METHODS,
        "--ratio",
        "0.4",
        "--workers",
        "0",
        "--clip-model",
        str(clip_of(model)),
        *extra,
    ]


@pytest.fixture(scope="module")
def first_run(model, reference, tmp_path_factory):
    """One full single-process run that several tests look at (and rerun)."""
    out = tmp_path_factory.mktemp("fid-out")
    extractor = TinyExtractor()
    rows = fid.main(argv(model, out, "--reference", reference), feature_extractor=extractor, lpips_net=tiny_lpips())
    return out, rows, extractor


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def state_of(out):
    """Every image and timing file with its modification time."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "images").rglob("*") if p.is_file()}


def test_end_to_end_writes_images_tables_and_plot(first_run):
    out, rows, _ = first_run
    for name in FOLDERS:
        images = sorted((out / "images" / name).glob("*.png"))
        assert [p.name for p in images] == [f"{i:05d}.png" for i in range(N_IMAGES)]
        assert pixels(images[0]).shape == (32, 32, 3)
        assert not list((out / "images" / name).glob(".*.tmp"))
    assert [r["label"] for r in rows] == [
        v.label for v in registry.variants(fid.registry.resolve_methods(NAMES), [0.4])
    ]
    assert rows[0]["method"] == "sd" and rows[0]["ratio"] is None
    for r in rows:
        assert r["images"] == N_IMAGES
        assert np.isfinite(r["fid"]) and r["fid"] > -1e-6
        assert r["sec_per_image"] > 0 and r["gb_per_image"] is None  # CPU: memory is not measured
        assert r["timed_images"] == N_IMAGES - BATCH  # the first batch is the warm-up
        assert r["clip_score"] > 0  # every method, SD included (the tiny CLIP's mean cosine is positive)
        for key in ("fid_vs_sd", "psnr", "ssim", "lpips"):  # against SD: not for SD itself
            assert (r[key] is None) == (r["method"] == "sd"), (r["label"], key)
    for r in rows[1:]:
        assert r["psnr"] > 10 and 0 < r["ssim"] <= 1 and r["lpips"] >= 0 and np.isfinite(r["fid_vs_sd"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["settings"]["images"] == N_IMAGES
    assert saved["settings"]["clip_model"].startswith(str(clip_of(saved["settings"]["model"])) + "@")
    assert saved["settings"]["lpips_model"].startswith("tiny-lpips@")
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == [r["method"] for r in rows]
    assert {"clip_score", "psnr", "ssim", "lpips"} <= set(table[0])
    md = (out / "results.md").read_text()
    assert "| SD | n/a |" in md and "| ToMeSD r=0.4 | 0.40 |" in md and "28.74" in md  # the paper's number beside ours
    assert "| CLIP score | PSNR vs SD (dB) | SSIM vs SD | LPIPS vs SD |" in md
    assert (out / "quality_vs_time.png").stat().st_size > 1000
    assert list((out / "cache").glob("reference-*.npz"))


def test_same_seed_same_image_under_every_method_and_agents_change_it(first_run):
    out, _, _ = first_run
    sd, tome = pixels(out / "images/sd/00003.png"), pixels(out / "images/tomesd-r0.4/00003.png")
    assert sd.shape == tome.shape
    # Different seeds give different images; the same seed stays close across methods.
    other = pixels(out / "images/sd/00004.png")
    assert np.abs(sd.astype(int) - tome).mean() < np.abs(sd.astype(int) - other).mean()


def test_rerun_skips_everything_and_keeps_timings(first_run, model, reference):
    out, rows, _ = first_run
    before = state_of(out)
    extractor = TinyExtractor()
    again = fid.main(argv(model, out, "--reference", reference), feature_extractor=extractor)
    assert state_of(out) == before  # no image rewritten, no timing record added
    assert extractor.images_seen == 0  # reference and image statistics came from the cache
    for a, b in zip(rows, again):
        assert a["fid"] == pytest.approx(b["fid"]) and a["sec_per_image"] == b["sec_per_image"]


def test_interrupted_batch_is_made_again_and_half_written_files_never_count(first_run, model, reference):
    out, _, _ = first_run
    folder = out / "images" / "sd"
    original = pixels(folder / "00003.png")
    (folder / "00003.png").unlink()
    (folder / ".00003.png.99999999.tmp").write_bytes(b"half a png")  # what a kill during save leaves
    before = state_of(out)
    fid.main(argv(model, out, "--reference", reference, "--methods", "sd"), feature_extractor=TinyExtractor())
    after = state_of(out)
    changed = {k for k in after if before.get(k) != after[k]}
    new_timing = [k for k in changed if "timing-" in k]
    assert changed - set(new_timing) == {"images/sd/00002.png", "images/sd/00003.png"}  # the whole batch 2-3
    assert [b["images"] for b in json.loads((out / new_timing[0]).read_text())["batches"]] == [[2, 3]]
    np.testing.assert_array_equal(pixels(folder / "00003.png"), original)
    assert not list(folder.glob(".*.tmp"))  # the dead process's temporary is gone


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    from atomic_write import remove_stale_temporaries

    (tmp_path / "images").mkdir()
    dead, alive = tmp_path / "images" / ".00001.png.99999999.tmp", tmp_path / ".results.json.1.tmp"  # pid 1 lives
    mine, image = tmp_path / f".settings.json.{os.getpid()}.tmp", tmp_path / "images" / "00001.png"
    for path in (dead, alive, mine, image):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert alive.exists() and mine.exists() and image.exists()


def test_other_settings_in_the_same_folder_are_refused(first_run, model, capsys):
    out, _, _ = first_run
    with pytest.raises(SystemExit):
        fid.main(argv(model, out, "--steps", "3", "--no-fid"))
    err = capsys.readouterr().err
    assert "--out" in err and "steps: 2 -> 3" in err


def test_reference_npz_and_no_reference(first_run, model, tmp_path):
    out, rows, _ = first_run
    stats = fm.Stats.load(next((out / "cache").glob("reference-*.npz")))
    np.savez(tmp_path / "ref.npz", mu=stats.mu, sigma=stats.sigma)
    with_npz = fid.main(argv(model, out, "--reference", str(tmp_path / "ref.npz")), feature_extractor=TinyExtractor())
    assert [r["fid"] for r in with_npz] == pytest.approx([r["fid"] for r in rows])
    without = fid.main(argv(model, out), feature_extractor=TinyExtractor())
    assert all(r["fid"] is None for r in without)
    assert [r["fid_vs_sd"] for r in without] == [r["fid_vs_sd"] for r in rows]
    timed_only = fid.main(argv(model, out, "--no-fid"))  # no extractor needed at all
    assert all(r["fid"] is None and r["fid_vs_sd"] is None for r in timed_only)
    assert [r["sec_per_image"] for r in timed_only] == [r["sec_per_image"] for r in without]


def test_real_run_builds_the_inception_network_through_the_same_path(first_run, model, tmp_path, monkeypatch):
    out, rows, _ = first_run
    weights = tmp_path / fm.INCEPTION_FILE
    weights.write_bytes(b"stand-in")
    asked = []
    monkeypatch.setattr(fm, "torch_fidelity_available", lambda: True)
    monkeypatch.setattr(fm, "build_inception", lambda path: asked.append(path) or TinyExtractor())
    again = fid.main(argv(model, out, "--inception-weights", str(weights)))
    assert asked == [str(weights)]
    assert [r["fid_vs_sd"] for r in again] == pytest.approx([r["fid_vs_sd"] for r in rows])


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--ratio", "1.0"], "--ratio"),
        (["--ratio", "0.4", "-0.1"], "--ratio"),
        (["--methods", "sd,tome"], "--methods"),
        (["--reference", "/no/such/folder"], "--reference"),
        (["--inception-weights", "/no/such/file.pth"], "--inception-weights"),
        (["--dtype", "float16", "--device", "cpu"], "--dtype"),
        (["--size", "30"], "--size"),
        (["--scheduler", "nope"], "--scheduler"),
        (["--workers", "-1"], "--workers"),
        (["--guidance", "nan"], "--guidance"),
        (["--images-per-class", "0"], "--images-per-class"),
        (["--prompts", "/no/such/prompts.txt"], "--prompts"),
        (["--prompts", __file__, "--prompt", "a {}"], "--prompts"),
        (["--clip-model", "/no/such/clip"], "--clip-model"),
    ],
)
def test_bad_input_fails_before_anything_runs(model, tmp_path, monkeypatch, capsys, extra, flag):
    monkeypatch.setattr(fid, "load_pipeline", lambda args: pytest.fail("loaded the model despite bad input"))
    with pytest.raises(SystemExit) as exit_:
        fid.main(argv(model, tmp_path / "out", *extra), feature_extractor=TinyExtractor())
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, not even the output folder


def test_help_lists_the_registry_and_timing_only_methods_are_refused(model, tmp_path, monkeypatch, capsys):
    text = " ".join(fid.build_parser().format_help().split())
    timing_only = [n for n, m in registry.METHODS.items() if m.timing_only]
    for name, method in registry.METHODS.items():
        assert (f" {name}: " in text) != method.timing_only, name
    assert "(default: sd tomesd agentsd)" in text
    assert "(default: None)" not in text and "(default: CONFIG_3) (default" not in text  # each default once
    monkeypatch.setattr(fid, "load_pipeline", lambda args: pytest.fail("loaded the model despite bad input"))
    for name in timing_only:
        with pytest.raises(SystemExit):
            fid.main(argv(model, tmp_path / "out", "--methods", f"sd,{name}"))
        assert f"--methods: {name!r} only measures speed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_method_that_cannot_run_here_is_refused_before_anything_runs(model, tmp_path, monkeypatch, capsys):
    import dataclasses

    missing = dataclasses.replace(registry.TOMESD, package="no_such_package_here", install="no-such-package")
    monkeypatch.setitem(registry.METHODS, "tomesd", dataclasses.replace(registry.METHODS["tomesd"], parts=(missing,)))
    monkeypatch.setattr(fid, "load_pipeline", lambda args: pytest.fail("loaded the model despite a missing package"))
    with pytest.raises(SystemExit):
        fid.main(argv(model, tmp_path / "out", "--methods", "sd,tomesd"))
    err = capsys.readouterr().err
    assert "--methods: method 'tomesd' cannot run here" in err and "no-such-package" in err
    assert not (tmp_path / "out").exists()


def test_prompts_follow_the_protocol(model, tmp_path, monkeypatch):
    sd15 = fid.PipelineIndex("StableDiffusionPipeline", False, "PNDMScheduler", safety_checker=True)
    monkeypatch.setattr(fid, "read_pipeline_index", lambda model: sd15)  # the hub id, offline
    parser = fid.build_parser()
    args = parser.parse_args(["--out", str(tmp_path), "--no-fid", "--device", "cpu", "--methods", "sd"])
    fid.check_args(parser, args, PartialState())
    assert args.total == 2000 and len(args.prompt_list) == 1000
    assert fid.prompt_for(args, 0) == "A high quality photograph of a tench."
    assert fid.prompt_for(args, 1001) == "A high quality photograph of a goldfish."
    assert (args.steps, args.guidance, args.width, args.height, args.scheduler, args.model) == (
        50,
        7.5,
        512,
        512,
        "pndm",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    assert fid.protocol(args)["scheduler"] == "PNDMScheduler"


def test_the_script_runs_as_a_command_and_names_the_bad_flag(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "fid.py"), "--ratio", "1.5", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "--ratio: 1.5 is outside [0, 1)" in done.stderr


def test_unwritable_output_folder(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_pipeline", lambda args: pytest.fail("loaded the model despite bad input"))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit):
        fid.main(argv(model, tmp_path / "a-file" / "out"), feature_extractor=TinyExtractor())
    assert "--out" in capsys.readouterr().err


def test_no_inception_network_is_a_clear_error_before_generation(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fm, "torch_fidelity_available", lambda: False)
    monkeypatch.setattr(fid, "load_pipeline", lambda args: pytest.fail("loaded the model without an Inception network"))
    with pytest.raises(SystemExit):
        fid.main(argv(model, tmp_path / "out"))
    err = capsys.readouterr().err
    assert 'pip install -e ".[fid]"' in err and "--inception-weights" in err  # the README's command
    assert not (tmp_path / "out").exists()


def test_each_batch_is_timed_as_soon_as_it_is_saved(model, tmp_path):
    """A kill loses no finished batch's time: the record on disk grows batch by batch."""
    out, seen = tmp_path / "out", []
    load = fid.load_pipeline

    def load_and_watch(args):
        pipe = load(args)
        set_timesteps = pipe.scheduler.set_timesteps

        def watch(*a, **k):  # once per pipeline call, before its first UNet call: what is on disk so far?
            seen.append(fid.timing(out / "images" / "sd")["timed_images"])
            return set_timesteps(*a, **k)

        pipe.scheduler.set_timesteps = watch
        return pipe

    fid.load_pipeline = load_and_watch
    try:
        rows = fid.main(argv(model, out, "--methods", "sd", "--no-fid", "--no-clip"))
    finally:
        fid.load_pipeline = load
    assert seen == [
        0,
        2,
        2,
    ]  # before batch 1: nothing; before batch 2: batch 1 (the only one, so timed); then 1 warm-up
    assert rows[0]["timed_images"] == N_IMAGES - BATCH


def test_images_do_not_depend_on_the_batch_they_ran_in(first_run, model, tmp_path, capsys):
    """Every method, batch size 4 against 2: the same pixels (up to float rounding of other matrix shapes);
    a method whose images depend on their batch records its batch size and refuses a resume with another."""
    single, _, _ = first_run
    independent = [n for n in NAMES if not registry.METHODS[n].batch_dependent]
    dependent = sorted(set(NAMES) - set(independent))
    assert set(dependent) <= {"ca-tome"}
    out = tmp_path / "out"
    fid.main(argv(model, out, "--batch-size", "4", "--no-fid", "--no-clip", "--methods", *independent))
    for name in (v.name for v in registry.variants(registry.resolve_methods(independent), [0.4])):
        for i in range(N_IMAGES):
            a = pixels(out / "images" / name / f"{i:05d}.png").astype(int)
            b = pixels(single / "images" / name / f"{i:05d}.png")
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.002, (name, i)
    for name in dependent:
        with pytest.raises(SystemExit):
            fid.main(argv(model, single, "--batch-size", "4", "--no-fid", "--no-clip", "--methods", name))
        assert "batch_size: 2 -> 4" in capsys.readouterr().err


def test_prompt_file_gives_each_image_its_line_and_a_resume_with_others_is_refused(model, tmp_path, capsys):
    prompts = tmp_path / "captions.txt"
    prompts.write_text("a cat\n\n  a dog .  \na corgi\n")
    out = tmp_path / "out"
    parser = fid.build_parser()
    args = parser.parse_args(
        ["--model", model, "--out", str(out), "--prompts", str(prompts), "--device", "cpu", "--methods", "sd"]
    )
    fid.check_args(parser, args, PartialState())
    assert args.total == 3 and [fid.prompt_for(args, i) for i in (0, 1, 2, 3)] == [
        "a cat",
        "a dog .",
        "a corgi",
        "a cat",
    ]
    fid.main(
        argv(model, out, "--prompts", str(prompts), "--methods", "sd", "--num-images", "2", "--no-fid", "--no-clip")
    )
    settings = json.loads((out / "images" / "sd" / "settings.json").read_text())
    assert settings["prompts"].startswith("3 prompts, sha1 ")
    prompts.write_text("a cat\na dog\n")
    with pytest.raises(SystemExit):
        fid.main(argv(model, out, "--prompts", str(prompts), "--methods", "sd", "--num-images", "2", "--no-fid"))
    err = capsys.readouterr().err
    assert "--out" in err and "prompts: '3 prompts" in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


WRAPPER = """
import sys
sys.path[:0] = [{tests!r}, {eval!r}]
from test_fid_math import TinyExtractor
from test_fid_quality import save_tiny_clip, tiny_lpips
import fid
fid.main(sys.argv[1:], feature_extractor=TinyExtractor())
"""


def test_accelerate_launch_two_cpu_processes_shard_the_images(first_run, model, reference, tmp_path):
    single, _, _ = first_run
    wrapper = tmp_path / "run_fid.py"
    wrapper.write_text(WRAPPER.format(tests=str(ROOT / "tests"), eval=str(ROOT / "eval")))
    out = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # accelerate's --cpu alone starts one process unless mpirun is there; --multi_gpu is torchrun, and
    # with --device cpu the two processes meet over gloo.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(wrapper),
        *argv(model, out, "--reference", reference, "--device", "cpu", "--methods", "sd,tomesd", "--no-lpips"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ["sd", "tomesd-r0.4"]:
        folder = out / "images" / name
        records = [json.loads(p.read_text()) for p in folder.glob("timing-*.json")]
        made = sorted(i for r in records for b in r["batches"] for i in b["images"])
        assert made == list(range(N_IMAGES))  # none missing, none twice
        assert {r["process"] for r in records} == {0, 1}
        for i in range(N_IMAGES):  # the same images as the single-process run (up to thread-count rounding)
            a, b = pixels(folder / f"{i:05d}.png").astype(int), pixels(single / "images" / name / f"{i:05d}.png")
            assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.01
    assert done.stdout.count("results ->") == 1 and done.stdout.count("| Method |") == 1  # once, on the main process
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(r["images"] == N_IMAGES for r in rows)


def test_the_pipeline_loads_without_the_torch_dtype_deprecation(model):
    """diffusers >= 0.40 deprecates from_pretrained's torch_dtype= (a FutureWarning); fid.py uses the new name."""
    import argparse
    import warnings

    index = fid.read_pipeline_index(model)
    args = argparse.Namespace(model=model, dtype="float32", scheduler="pndm", device="cpu", index=index)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = fid.load_pipeline(args)
    assert pipe.unet.dtype == torch.float32
    assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]
