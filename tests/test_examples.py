"""The examples run end to end against tiny local pipelines, and fail early with useful messages.

Each script's ``main(argv)`` runs in-process on a tiny saved pipeline (2 steps, 32x32 px); the
notebook runs top to bottom in a real kernel with its model overridden through ``AGENTSD_MODEL``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import ModuleType

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient
from PIL import Image
from tiny import save_tiny_pipeline, tiny_pipeline, tiny_unet

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
for folder in (REPO, EXAMPLES):  # agentsd itself, and the examples' shared modules
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from canny import canny  # noqa: E402
from common import ExampleError, Target, run_cli  # noqa: E402
from comparison import METHODS, compare, generate, patched, warm_up  # noqa: E402
from images import contact_sheet, save_png  # noqa: E402

import agentsd  # noqa: E402
from agentsd import top_attention_downsample  # noqa: E402

TILE = 32  # the tiny pipelines' image size
FAST = ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--seed", "0"]
SCRIPTS = ("sdxl", "img2img", "controlnet", "compare_grid")


def load_script(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` under a name that cannot clash with other modules."""
    spec = importlib.util.spec_from_file_location(f"agentsd_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny pipelines saved with save_pretrained, as a user's local model folders would be."""
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny_pipeline(root / kind, kind) for kind in ("sd", "sdxl", "controlnet")}


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory: pytest.TempPathFactory):
    return tiny_pipeline("sd", tmp_path_factory.mktemp("sd_pipe"))


def sheet_width(path: Path) -> int:
    assert path.is_file(), f"{path} was not written"
    assert not list(path.parent.glob(".*.tmp")), "a temporary file was left behind"
    with Image.open(path) as image:
        return image.width


# --- each example, end to end ---------------------------------------------------------------------


def test_sdxl_script_writes_side_by_side(models: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--model", str(models["sdxl"]), "--prompt", "a corgi", *FAST, "--out", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_script("sdxl").main(argv)
    assert out == tmp_path / "sdxl.png"
    assert sheet_width(out) == len(METHODS) * TILE
    # diffusers >= 0.40 deprecates from_pretrained's torch_dtype=; the examples pass the name it takes
    assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("script", "given", "kind", "wanted"),
    [("sdxl", "sd", "SD 1.x/2.x", "SDXL"), ("img2img", "sdxl", "SDXL", "SD 1.x/2.x")],
)
def test_a_model_of_another_kind_is_refused_naming_both(
    script: str, given: str, kind: str, wanted: str, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SD 1.5 folder given to the SDXL example loaded, then failed in the call ('NoneType' has no 'tokenize')."""
    module = load_script(script)
    pipeline_class = module.StableDiffusionXLPipeline if script == "sdxl" else module.StableDiffusionImg2ImgPipeline
    monkeypatch.setattr(pipeline_class, "from_pretrained", lambda *a, **k: pytest.fail("loaded the wrong kind"))
    with pytest.raises(ExampleError) as error:
        module.main(["--model", str(models[given]), *FAST])
    message = str(error.value)
    assert f"is not an {wanted} model" in message and f"({kind})" in message
    assert ("examples/sdxl.py" if kind == "SDXL" else "examples/img2img.py") in message


def test_img2img_script_uses_sample_image_without_input(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "i2i.png"
    argv = ["--model", str(models["sd"]), "--prompt", "a cat", "--strength", "0.5", *FAST, "--out", str(out)]
    assert load_script("img2img").main(argv) == out
    assert sheet_width(out) == (1 + len(METHODS)) * TILE  # input, then one tile per method


def test_img2img_script_reads_image(models: dict[str, Path], tmp_path: Path) -> None:
    picture = tmp_path / "input.png"
    Image.new("RGB", (40, 24), "red").save(picture)
    argv = ["--model", str(models["sd"]), "--image", str(picture), "--methods", "SD", "AgentSD", *FAST]
    out = load_script("img2img").main([*argv, "--out", str(tmp_path)])
    assert sheet_width(out) == 3 * TILE


@pytest.mark.parametrize("script", ["img2img", "controlnet"])
def test_input_image_is_resized_to_the_models_native_size(script: str, models: dict[str, Path], tmp_path: Path) -> None:
    """The tiny SD models are trained at 32 px (sample_size 16, VAE factor 2), as SD 1.5 is at 512."""
    picture = tmp_path / "input.png"
    Image.new("RGB", (40, 24), "red").save(picture)
    model = models["sd" if script == "img2img" else "controlnet"]
    argv = ["--model", str(model), "--image", str(picture), "--steps", "2", "--device", "cpu", "--methods", "SD"]
    if script == "controlnet":
        argv += ["--controlnet", str(model / "controlnet")]
    out = load_script(script).main([*argv, "--out", str(tmp_path)])
    with Image.open(out) as sheet:
        assert sheet.width == 2 * TILE  # input and one result, each 32 px wide (not 512)


def test_controlnet_script_writes_edges_and_results(models: dict[str, Path], tmp_path: Path) -> None:
    folder = models["controlnet"]
    argv = ["--model", str(folder), "--controlnet", str(folder / "controlnet"), "--prompt", "a dog", *FAST]
    out = load_script("controlnet").main([*argv, "--out", str(tmp_path)])
    assert sheet_width(out) == (1 + len(METHODS)) * TILE


def test_compare_grid_has_a_row_per_prompt(models: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    argv = ["--model", str(models["sd"]), "--prompt-file", str(prompts), *FAST, "--out", str(tmp_path / "g.png")]
    out = load_script("compare_grid").main(argv)
    with Image.open(out) as grid:
        assert grid.width == len(METHODS) * TILE
        assert grid.height > 2 * TILE  # two rows of tiles plus titles and captions


def notebook_code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.outputs and cell.execution_count is None for cell in notebook_code_cells(notebook))


def test_notebook_runs_top_to_bottom(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("AGENTSD_MODEL", str(models["sd"]))
    monkeypatch.setenv("AGENTSD_STEPS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch, as conftest does here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": EXAMPLES}})
    client.execute()

    last = notebook_code_cells(notebook)[-1].outputs
    assert any("image/png" in output.get("data", {}) for output in last), "the side-by-side image is not shown"
    printed = "".join(output.get("text", "") for output in last)
    assert all(method in printed for method in METHODS)


# --- what the examples share ----------------------------------------------------------------------


def test_compare_is_seeded_and_leaves_pipeline_unpatched(sd_pipe) -> None:
    call = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "np"}
    runs = compare(sd_pipe, METHODS, ratio=0.4, seed=3, **call)
    assert [run.method for run in runs] == list(METHODS)
    assert not agentsd.is_patched(sd_pipe)
    again = generate(sd_pipe, "SD", seed=3, **call)
    np.testing.assert_array_equal(again.image, runs[0].image)  # same seed, same image
    assert not np.array_equal(runs[2].image, runs[0].image)  # AgentSD really ran patched


class _RecordingPipe:
    """Stands in for a pipeline: records each call's step count."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.steps: list[int] = []

    def __call__(self, **kwargs):
        self.steps.append(kwargs["num_inference_steps"])
        return type("Output", (), {"images": [Image.new("RGB", (TILE, TILE))]})()


@pytest.mark.parametrize(("strength", "warm_steps"), [(None, 1), (0.75, 2), (0.3, 4), (1.0, 1)])
def test_sd_is_timed_after_a_short_warm_up_on_the_cpu_too(strength, warm_steps) -> None:
    """The first call pays one-off costs; untimed and short, it keeps them out of the SD column."""
    pipe = _RecordingPipe()
    call = {"prompt": "a cat", "num_inference_steps": 10} | ({"strength": strength} if strength else {})
    runs = compare(pipe, ["SD"], ratio=0.4, seed=0, **call)
    assert pipe.steps == [warm_steps, 10] and len(runs) == 1
    warm_up(pipe, **call)
    assert pipe.steps[-1] == warm_steps
    compare(pipe, ["SD"], ratio=0.4, seed=0, warm=False, **call)
    assert pipe.steps[-1] == 10 and len(pipe.steps) == 4


def test_a_busy_machine_is_warned_before_timing_as_speed_does(monkeypatch, capsys) -> None:
    """Deterministic: the load reading is given; the warning is eval/timing.py's, once, after the warm-up."""
    import timing

    monkeypatch.setattr(timing, "CPUS", 2)
    monkeypatch.setattr(timing, "machine_load", lambda: 5.0)
    compare(_RecordingPipe(), ["SD"], ratio=0.4, seed=0, prompt="a cat", num_inference_steps=2)
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1
    assert "examples: WARNING: load average 5.0 on 2 CPUs before timing: other work is running" in err
    monkeypatch.setattr(timing, "machine_load", lambda: 2.0)  # this run's own threads: quiet
    compare(_RecordingPipe(), ["SD"], ratio=0.4, seed=0, prompt="a cat", num_inference_steps=2)
    assert "WARNING" not in capsys.readouterr().err


def test_the_examples_compare_the_registrys_methods() -> None:
    import methods as registry

    assert METHODS == tuple(registry.METHODS[name].label for name in ("sd", "tomesd", "agentsd"))
    assert METHODS == ("SD", "ToMeSD", "AgentSD")


def test_tomesd_is_pointed_at_the_top_attention_level() -> None:
    assert top_attention_downsample(tiny_unet("sd1")) == 1
    assert top_attention_downsample(tiny_unet("sdxl")) == 2  # tomesd's default of 1 would patch nothing


def test_patch_is_removed_when_generation_fails(sd_pipe) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with patched(sd_pipe, "AgentSD", ratio=0.4):
            assert agentsd.is_patched(sd_pipe)
            raise RuntimeError("boom")
    assert not agentsd.is_patched(sd_pipe)


def test_canny_traces_a_square_with_one_pixel_lines() -> None:
    square = np.zeros((32, 32), dtype=np.uint8)
    square[8:24, 8:24] = 255
    edges = np.asarray(canny(Image.fromarray(square)))[..., 0] > 0
    assert edges[16, 7] and edges[7, 16]  # left and top sides of the square
    assert not edges[12:20, 12:20].any() and not edges[:4].any()  # nothing inside or far outside
    assert edges[16].sum() == 2  # a row crosses exactly two one-pixel lines


def test_contact_sheet_lays_out_rows_and_save_png_replaces(tmp_path: Path) -> None:
    tile = Image.new("RGB", (20, 10), "blue")
    sheet = contact_sheet([[("a", tile), ("b", tile)], [("c", tile)]], titles=["one", "two"])
    assert sheet.width == 40
    path = save_png(sheet, tmp_path / "nested" / "sheet.png")
    save_png(tile, path)  # overwrite in place
    assert sheet_width(path) == 20


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script: str) -> None:
    parser = load_script(script).build_parser()
    for action in parser._actions:
        if action.dest != "help" and (action.default is not None or action.dest in ("height", "width")):
            assert "(default: " in action.help, f"{script}: {action.option_strings} hides its default"
    sizes = {action.dest: action.help for action in parser._actions if action.dest in ("height", "width")}
    assert sizes == dict.fromkeys(("height", "width"), "in pixels (default: the model's native size)")


# --- errors a new user hits, reported before any model is loaded ------------------------------------

MISSING = ["--model", "nobody/agentsd-no-such-model"]


def test_cuda_without_gpu_suggests_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExampleError, match="--device cpu"):
        load_script("sdxl").main([*MISSING, "--device", "cuda"])  # fails before the model lookup


def test_float16_on_cpu_is_refused() -> None:
    with pytest.raises(ExampleError, match="--dtype float32"):
        load_script("compare_grid").main([*MISSING, "--device", "cpu", "--dtype", "float16"])


def test_default_device_and_dtype_fit_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Target.resolve() == Target(torch.device("cpu"), torch.float32)


def test_unknown_hub_id_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ExampleError) as error:
        load_script("img2img").main([*MISSING, "--device", "cpu", "--out", str(tmp_path)])
    message = str(error.value)
    assert "--model 'nobody/agentsd-no-such-model'" in message
    assert "hf auth login" in message and "HF_HUB_OFFLINE" in message and "--model ./model" in message
    assert not list(tmp_path.iterdir())
    # the project's explanation leads, not the hub library's "pass local_files_only=False" (no help offline)
    first = message.splitlines()[0]
    assert "not (completely) in the local Hugging Face cache" in first and "HF_HUB_OFFLINE is set" in first
    assert "local_files_only" not in first and "the loader said: " in message


def test_every_script_fails_fast_without_a_network(tmp_path: Path) -> None:
    """No network (the hub's host refuses connections) and no cache: each script fails in seconds.

    Without the up-front check huggingface_hub retries AutoPipeline's config lookup for about 30 s
    (1 + 2 + 4 + 8 + 8 s of backoff). HF_HUB_OFFLINE is unset here, so nothing but the check helps.
    """
    driver = textwrap.dedent(
        f"""
        import importlib, sys, time
        sys.path[:0] = [{str(REPO)!r}, {str(EXAMPLES)!r}]
        from common import ExampleError
        for name in {SCRIPTS!r}:
            script = importlib.import_module(name)
            start = time.perf_counter()
            try:
                script.main(["--device", "cpu", "--out", {str(tmp_path)!r}])
            except ExampleError as err:
                print(name, round(time.perf_counter() - start, 1), "cannot be reached" in str(err), flush=True)
        """
    )
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_") and key not in proxies}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=300)
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [row[0] for row in rows] == list(SCRIPTS), done.stderr[-2000:]
    for name, seconds, explained in rows:
        assert explained == "True", f"{name}: the error does not say the hub cannot be reached"
        assert float(seconds) < 10, f"{name} took {seconds} s to fail without a network"


def test_missing_controlnet_names_its_flag(models: dict[str, Path]) -> None:
    argv = ["--model", str(models["controlnet"]), "--controlnet", "nobody/no-such-controlnet", "--device", "cpu"]
    with pytest.raises(ExampleError, match="could not load --controlnet"):
        load_script("controlnet").main(argv)


def test_missing_local_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ExampleError, match="no such folder"):
        load_script("sdxl").main(["--model", str(tmp_path / "nowhere"), "--device", "cpu"])


def test_folder_that_is_not_a_pipeline_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ExampleError, match="save_pretrained"):
        load_script("sdxl").main(["--model", str(tmp_path), "--device", "cpu"])


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--ratio", "1.5"], "--ratio"),
        (["--steps", "0"], "--steps"),
        (["--height", "30"], "--height"),
        (["--out", "grid.jpg"], "--out"),
        (["--methods", "SD", "FastSD"], "--methods"),
        (["--dtype", "float8"], "--dtype"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("compare_grid").main(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"not an image"])
def test_bad_input_image_names_the_flag(content, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    picture = tmp_path / "picture.png"
    if content is not None:
        picture.write_bytes(content)
    with pytest.raises(SystemExit):
        load_script("controlnet").main(["--image", str(picture)])
    assert "--image" in capsys.readouterr().err


def test_img2img_refuses_zero_effective_steps(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_script("img2img").main(["--steps", "1", "--strength", "0.5"])
    assert "--strength 0.5 runs no denoising step" in capsys.readouterr().err


def test_empty_prompt_file_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "prompts.txt").write_text("\n \n")
    with pytest.raises(SystemExit):
        load_script("compare_grid").main(["--prompt-file", str(tmp_path / "prompts.txt")])
    assert "--prompt-file" in capsys.readouterr().err


def test_run_cli_prints_one_line_not_a_traceback() -> None:
    def main(argv):
        raise ExampleError("--device cuda was asked for; use --device cpu")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == "error: --device cuda was asked for; use --device cpu"
