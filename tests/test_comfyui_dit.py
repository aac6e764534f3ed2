"""The AgentSD node on ComfyUI's diffusion transformers, SD3.5 (dual attention) and Flux, on the real
(vendored) engine, offline, on the CPU.

The models are small and have random weights (eval/comfy_dits.py); their diffusers twins hold the same
weights, through ComfyUI's own diffusers-to-ComfyUI key map.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
import comfy_engine  # noqa: E402

comfy_engine.load_engine()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy_dits  # noqa: E402
import nodes  # noqa: E402

import agentsd  # noqa: E402
from agentsd.comfy_patch import apply_agentsd, patched_state  # noqa: E402

NODE_FOLDER = REPO / "comfyui-agentsd"
WORKFLOWS = NODE_FOLDER / "workflows"
KINDS = ("sd3", "flux")


@pytest.fixture(scope="module")
def models():
    """(ComfyUI model, diffusers twin) by kind: SD3.5-shaped with its second attention, and Flux schnell."""
    return {kind: comfy_dits.random_dit(kind) for kind in KINDS}


@pytest.fixture(params=KINDS)
def dit(request, models):
    """(kind, ComfyUI model, diffusers twin)."""
    return request.param, *models[request.param]


def latent(batch: int = 2, side: int = 16) -> torch.Tensor:
    return torch.randn(batch, 16, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("batch", [2, 1])
@pytest.mark.parametrize("use_rand", [False, True], ids=["fixed", "random"])
@pytest.mark.parametrize("sigma", [0.9, 0.3], ids=["agent-phase", "tome-phase"])
def test_same_output_as_the_diffusers_patch(dit, sigma: float, use_rand: bool, batch: int) -> None:
    """Equal to 1e-4 in fp32, in both phases, with fixed and random destinations; random destinations at an
    odd batch only on Flux (SD3's batch holds guidance pairs), as in the diffusers patch."""
    kind, model, twin = dit
    x = latent(batch)
    context, pooled = comfy_dits.conditioning(model, batch)
    unpatched = comfy_dits.twin_call(twin, kind, x, sigma, context, pooled)()
    patched_twin = copy.deepcopy(twin)
    agentsd.apply_patch(patched_twin, ratio=0.4, use_rand=use_rand)
    expected = comfy_dits.twin_call(patched_twin, kind, x, sigma, context, pooled)()
    patched = apply_agentsd(model, agentsd.AgentSDConfig(ratio=0.4, use_rand=use_rand))
    state = patched_state(patched)
    drawn = []
    start_call = state.start_call
    state.start_call = lambda *args: (start_call(*args), drawn.append(state.keys is not None))
    out = comfy_dits.model_call(patched, x, sigma, context, pooled)()

    scale = expected.abs().max()
    assert (out - expected).abs().max() <= 1e-4 * scale
    assert (unpatched - expected).abs().max() > 1e-2 * scale  # AgentSD changed the output
    assert drawn == [use_rand and (batch == 2 or kind == "flux")]
    agents = sigma > 0.6
    assert [(b.last_run.phase, b.last_run.merged, b.last_run.agents) for b in state.blocks] == [
        (1 - agents, True, agents)
    ] * 2


def test_patches_a_clone_and_comfy_unpatching_restores_the_model(dit) -> None:
    kind, model, _ = dit
    x, (context, pooled) = latent(), comfy_dits.conditioning(model, 2)
    before = comfy_dits.model_call(model, x, 0.9, context, pooled)()
    options = copy.deepcopy(model.model_options)
    patched = apply_agentsd(model, agentsd.AgentSDConfig())
    assert patched is not model and model.model_options == options and not model.wrappers.get("apply_model")
    assert not torch.equal(comfy_dits.model_call(patched, x, 0.9, context, pooled)(), before)
    assert torch.equal(comfy_dits.model_call(model, x, 0.9, context, pooled)(), before)
    twinned = [name for name, module in model.model.named_modules() if type(module).__name__.startswith("AgentSD")]
    assert not twinned


def phases_per_call(patched) -> list[tuple[float, int]]:
    """Spy on the model's state: the sigma and phase of every model call from now on."""
    state = patched_state(patched)
    calls: list[tuple[float, int]] = []
    start_call = state.start_call

    def spy(x, sigma):
        start_call(x, sigma)
        calls.append((float(sigma.flatten()[0]), state.phase_index))

    state.start_call = spy
    return calls


def sample(model, kind: str, steps: int, sampler: str, scheduler: str, denoise: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    empty = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(empty.shape, generator=generator)
    context, pooled = comfy_dits.conditioning(model, 1)
    cond, uncond = [[context, {"pooled_output": pooled}]], [[torch.zeros_like(context), {"pooled_output": pooled * 0}]]
    cfg = 4.5 if kind == "sd3" else 1.0
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, cond, uncond, empty, denoise=denoise, disable_pbar=True, seed=0
    )


def test_every_sampler_and_scheduler_runs_both_phases_in_order(dit) -> None:
    """Every sampler of ComfyUI's KSampler (with the simple scheduler) and every scheduler (with euler):
    the first call in the agent phase, some in the ToMe phase, and the phase in order of the calls' noise
    levels (samplers that look ahead, as heunpp2, call a lower sigma before a higher one)."""
    kind, model, _ = dit
    runs = [(name, "simple") for name in comfy.samplers.KSampler.SAMPLERS]
    runs += [("euler", name) for name in comfy.samplers.KSampler.SCHEDULERS]
    for sampler, scheduler in runs:
        patched = apply_agentsd(model, agentsd.AgentSDConfig(ratio=0.4))
        calls = phases_per_call(patched)
        out = sample(patched, kind, 6, sampler, scheduler)  # SD3 shifts sigma up: 6 steps reach below 0.6
        assert torch.isfinite(out).all()
        by_noise = [phase for _, phase in sorted(calls, key=lambda call: -call[0])]
        assert calls[0][1] == 0 and by_noise[-1] == 1 and by_noise == sorted(by_noise), (sampler, scheduler, calls)


def test_denoise_below_the_switch_runs_the_tome_phase_only(dit) -> None:
    kind, model, _ = dit
    patched = apply_agentsd(model, agentsd.AgentSDConfig(ratio=0.4))
    calls = phases_per_call(patched)
    sample(patched, kind, 4, "euler", "simple", denoise=0.25)  # SD3 (shift 3) starts at sigma 0.5
    assert calls and {phase for _, phase in calls} == {1}


def test_a_max_downsample_that_selects_no_block_is_refused_in_words(dit) -> None:
    kind, model, _ = dit
    if kind == "sd3":  # SD3's blocks see the latent at its patch size, 2, as in the diffusers patch
        with pytest.raises(ValueError, match="selects no block of this SD3 model"):
            apply_agentsd(model, agentsd.AgentSDConfig(max_downsample=1))
    else:
        assert len(patched_state(apply_agentsd(model, agentsd.AgentSDConfig(max_downsample=1))).blocks) == 2


class _TestCLIP:
    """A text encoder stand-in: seeded random embeddings and pooled vectors per text, at the model's widths."""

    def __init__(self, width: int, pooled: int) -> None:
        self.width, self.pooled = width, pooled

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        generator = torch.Generator().manual_seed(len(tokens))
        context = torch.randn(1, comfy_dits.TEXT_TOKENS, self.width, generator=generator)
        return [[context, {"pooled_output": torch.randn(1, self.pooled, generator=generator)}]]


class _TestVAE:
    """A decoder stand-in: the latent's first three channels, upsampled 8x, squashed to [0, 1]."""

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(samples[:, :3], scale_factor=8).sigmoid().movedim(1, -1)


def _stand_in(outputs: tuple[str, ...], make) -> type:
    """A loader node for the tests, without inputs, returning ``make()``."""
    return type(
        "AgentSDTestLoader",
        (),
        {
            "RETURN_TYPES": outputs,
            "FUNCTION": "load",
            "CATEGORY": "loaders",
            "INPUT_TYPES": classmethod(lambda cls: {"required": {}}),
            "load": lambda self: make(),
        },
    )


#: The loaders of the example workflows, by class, and what their stand-ins return.
LOADERS = {
    "CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"),
    "UNETLoader": ("MODEL",),
    "TripleCLIPLoader": ("CLIP",),
    "DualCLIPLoader": ("CLIP",),
    "VAELoader": ("VAE",),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The node folder loaded by ComfyUI's own custom-node loader, with the built-in SD3 and Flux nodes a
    server loads (``EmptySD3LatentImage``, ``FluxGuidance``); outputs to a temporary folder."""
    import folder_paths

    comfy_engine.load_node_folder(NODE_FOLDER)
    for extra in ("nodes_sd3.py", "nodes_flux.py"):
        comfy_engine.load_builtin_extra(extra)
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("comfy-output")))
    yield folder_paths.get_output_directory()


@pytest.mark.parametrize(
    ("workflow", "kind", "family"), [("sd35_txt2img.json", "sd3", "SD3"), ("flux_txt2img.json", "flux", "FluxSchnell")]
)
def test_example_workflows_run_in_comfys_prompt_executor(
    engine, models, workflow: str, kind: str, family: str, caplog
) -> None:
    model = models[kind][0]
    clip = _TestCLIP(*(t.shape[-1] for t in comfy_dits.conditioning(model, 1)))
    made = {"MODEL": model, "CLIP": clip, "VAE": _TestVAE()}
    prompt = json.loads((WORKFLOWS / workflow).read_text())
    for node in prompt.values():
        if node["class_type"] in LOADERS:
            outputs = LOADERS[node["class_type"]]
            name = f"AgentSDTest{node['class_type']}"
            nodes.NODE_CLASS_MAPPINGS[name] = _stand_in(
                outputs, lambda outputs=outputs: tuple(made[o] for o in outputs)
            )
            node["class_type"], node["inputs"] = name, {}
        elif node["class_type"] == "EmptySD3LatentImage":
            node["inputs"] |= {"width": 128, "height": 128}
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 6  # SD3 shifts sigma up: 6 steps reach below 0.6
    caplog.set_level(logging.DEBUG, logger="agentsd")
    executor = comfy_engine.run_prompt(prompt)
    assert f"agentsd: {family}, " in caplog.text
    assert ": phase 0, agent attention" in caplog.text and ": phase 1, ToMe" in caplog.text
    saved = [image for output in executor.history_result["outputs"].values() for image in output.get("images", [])]
    assert len(saved) == 1 and Path(engine, saved[0]["subfolder"], saved[0]["filename"]).is_file()


def test_speed_script_times_the_dit_methods_interleaved(capsys) -> None:
    import comfyui_speed

    results = comfyui_speed.main(
        ["--model", "flux", "--layout", "tiny", "--resolutions", "128", "--warmup", "0", "--repeats", "1"]
    )
    assert {method: len(seconds) for method, seconds in results[128].items()} == dict.fromkeys(
        comfy_dits.DIT_METHODS, 1
    )
    out = capsys.readouterr().out
    assert "| method @ 128 px | s/forward | vs comfyui / diffusers |" in out and "| agentsd-agents |" in out
