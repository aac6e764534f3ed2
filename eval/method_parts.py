"""The parts the registry's methods are made of (``methods.py``): one library's patch each, with its
apply, its remove and the record of its settings.

A :class:`Part` is what ``methods.Method.applied`` applies in turn: tomesd, AgentSD (its recipe or
one fixed phase), CA-ToMe, DeepCache, T-GATE, ToDo, HiDiffusion and the ceiling. Each adapter checks
its target before changing it and leaves the pipeline as it was once removed (:class:`Leftovers`
drops what a library's remove leaves behind). The methods' exact settings: ``methods.py``'s docstring.

The top attention level and AgentSD's blocks come from agentsd's public selection,
:func:`agentsd.top_attention_downsample` and :func:`agentsd.select_blocks`, so that the peers
patch the level AgentSD patches and the ceiling skips exactly AgentSD's blocks.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Any

import torch

from method_options import MethodOptions  # isort: skip


#: Calls the patched pipeline: ``generate(**call_kwargs)`` -> the pipeline's output.
Generate = Callable[..., Any]
#: Undoes one part's patch.
Remove = Callable[[], None]

#: AgentSD's keyword settings of each AgentSD-based method (the phases: one fixed phase for all steps).
AGENTSD_KWARGS: dict[str, dict[str, Any]] = {
    "agentsd": {},
    "agent-phase": {"schedule": "fixed", "sx": 4, "sy": 4, "agent_ratio": 0.95},
    "tome-phase": {"schedule": "fixed", "sx": 2, "sy": 2, "agent_ratio": 0.5},
}


def _unet(target: Any) -> torch.nn.Module:
    return getattr(target, "unet", target)


def _top(target: Any) -> int:
    """The top attention level of ``target``'s UNet (1 on SD 1.x/2.x, 2 on SDXL), as AgentSD finds it.

    tomesd's ``max_downsample`` defaults to 1, which patches nothing on SDXL (no attention at the
    top level); passing this value makes it patch the same level as AgentSD's default.
    """
    import agentsd

    return agentsd.top_attention_downsample(target)


def _transformer(target: Any) -> torch.nn.Module | None:
    """The diffusion transformer (SD3, Flux, PixArt) of ``target``, as AgentSD finds it; ``None`` for a UNet."""
    from agentsd.diffusers_patch.backbones import backbone_of, find_backbone

    model = find_backbone(target)
    return None if backbone_of(model).family == "UNet" else model


def _require_pipeline(target: Any, method: str, *classes: str) -> None:
    """Refuse, before any change, a target that is not one of the diffusers pipeline ``classes``."""
    import diffusers

    if not isinstance(target, tuple(getattr(diffusers, name) for name in classes)):
        raise TypeError(f"{method} needs a diffusers {' or '.join(classes)}, got {type(target).__name__}")


@functools.cache
def import_problem(package: str, install: str) -> str | None:
    """Why ``package`` cannot be used here (missing, or failing to import with this diffusers), else ``None``."""
    if find_spec(package) is None:
        return f"the {package} package is not installed: pip install {install}"
    try:
        importlib.import_module(package)
    except Exception as error:  # any import failure makes the method unavailable, with its reason
        return (
            f"{install.split()[-1]} {_version(install.split()[-1])} fails to import with diffusers "
            f"{_version('diffusers')} and torch {torch.__version__}: {type(error).__name__}: {error}"
        )
    return None


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(not installed)"


class Leftovers:
    """The instance attributes of a target and its UNet's modules, to drop what a library's remove leaves."""

    def __init__(self, target: Any) -> None:
        objects = [target, *_unet(target).modules()] if hasattr(target, "unet") else list(target.modules())
        self.before = [(obj, dict(vars(obj))) for obj in objects]

    def drop(self) -> None:
        for obj, before in self.before:
            now = vars(obj)
            for key in [key for key in now if key not in before]:
                del now[key]
            if "forward" in before and now.get("forward") is not before["forward"]:
                now["forward"] = before["forward"]


@dataclass(frozen=True)
class Part:
    """One library's patch.

    Attributes:
        apply: ``apply(target, ratio, seed, options) -> remove``; checks the target before changing it.
        settings: ``settings(ratio, options) -> dict``, JSON-able, of everything that shapes the output.
        package: Import name of the library (``None``: this repository's own ``agentsd``).
        install: The pip arguments that install it.
        generate: ``generate(target, options) -> Generate`` where the library has its own loop.
        tidy: Drop what the library's remove leaves behind (see :class:`Leftovers`).
        batch_dependent: An image depends on the other images of its batch (CA-ToMe merges, in every
            image, as many tokens as the batch's image with the most pairs above its threshold).
        compile_whole: ``compile_whole(target, options)`` compiles the patched UNet whole the library's
            own way, with ``torch.compile``'s ``options`` (AgentSD: :func:`agentsd.compile_unet`, a graph
            per phase, which CUDA graphs capture); ``None``: ``torch.compile`` of the UNet, patch or not.
    """

    apply: Callable[[Any, float | None, int, MethodOptions], Remove]
    settings: Callable[[float | None, MethodOptions], dict[str, Any]]
    package: str | None = None
    install: str | None = None
    generate: Callable[[Any, MethodOptions], Generate] | None = None
    tidy: bool = True
    batch_dependent: bool = False
    compile_whole: Callable[[Any, dict[str, Any]], None] | None = None

    @property
    def distribution(self) -> str:
        return self.install.split()[-1] if self.install else "agentsd"

    def unavailable(self) -> str | None:
        return None if self.package is None else import_problem(self.package, self.install)


def _tomesd(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    if (transformer := _transformer(target)) is not None:
        raise TypeError(f"tomesd patches a UNet's transformer blocks; {type(transformer).__name__} is not a UNet")
    import tomesd

    tomesd.apply_patch(target, ratio=ratio, max_downsample=_top(target))
    return lambda: tomesd.remove_patch(target)


TOMESD = Part(
    _tomesd,
    lambda ratio, options: {"tomesd": {"max_downsample": "top attention level"}},
    package="tomesd",
    install="tomesd",
)


def agentsd_part(name: str) -> Part:
    """AgentSD with the settings of registry method ``name`` (:data:`AGENTSD_KWARGS`)."""

    def apply(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
        import agentsd

        agentsd.apply_patch(target, ratio=ratio, seed=seed, **AGENTSD_KWARGS[name])
        return lambda: agentsd.remove_patch(target)

    def compile_whole(target: Any, options: dict[str, Any]) -> None:
        import agentsd

        agentsd.compile_unet(target, **options)

    return Part(
        apply, lambda ratio, options: {"agentsd": dict(AGENTSD_KWARGS[name])}, tidy=False, compile_whole=compile_whole
    )


def _ca_tome(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    _require_pipeline(target, "ca-tome", "StableDiffusionPipeline")
    from ca_tome import CacheConf
    from ca_tome.modifiers import modify_pipeline, modify_unet
    from ca_tome.patch import apply_patch, remove_patch

    # What apply_CA_ToMe does, with max_downsample at the top attention level as for tomesd.
    modify_unet(target.unet)
    modify_pipeline(target)
    apply_patch(
        target, getattr(CacheConf, options.ca_tome_cache), options.ca_tome_threshold, max_downsample=_top(target)
    )
    return lambda: remove_patch(target)


CA_TOME = Part(
    _ca_tome,
    lambda ratio, options: {
        "ca_tome": {
            "threshold": options.ca_tome_threshold,
            "cache": options.ca_tome_cache,
            "max_downsample": "top attention level",
        }
    },
    package="ca_tome",
    # Its metadata pins torch<2.2.2 and numpy<2, which it does not need; without --no-deps pip replaces torch.
    install="--no-deps ca-tome",
    generate=lambda target, options: target.call,
    batch_dependent=True,
)


def _deepcache(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    if not (hasattr(target, "unet") and hasattr(target, "scheduler")):
        raise TypeError(
            f"deepcache needs a pipeline (an object with .unet and .scheduler), got {type(target).__name__}"
        )
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=target)
    helper.set_params(cache_interval=options.deepcache_interval, cache_branch_id=options.deepcache_branch)
    helper.enable()
    return helper.disable


DEEPCACHE = Part(
    _deepcache,
    lambda ratio, options: {
        "deepcache": {"cache_interval": options.deepcache_interval, "cache_branch_id": options.deepcache_branch}
    },
    package="DeepCache",
    install="DeepCache",
)


def _tgate(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    _require_pipeline(target, "tgate", "StableDiffusionPipeline", "StableDiffusionXLPipeline")
    import tgate
    from diffusers import StableDiffusionXLPipeline

    (tgate.TgateSDXLLoader if isinstance(target, StableDiffusionXLPipeline) else tgate.TgateSDLoader)(target)
    return lambda: None  # tgate has no remove: pipe.tgate and its Attention.forward wrappers are dropped as leftovers


def _tgate_settings(options: MethodOptions) -> dict[str, int]:
    return {
        "gate_step": options.tgate_gate_step,
        "sp_interval": options.tgate_sp_interval,
        "fi_interval": options.tgate_fi_interval,
        "warm_up": options.tgate_warm_up,
    }


TGATE = Part(
    _tgate,
    lambda ratio, options: {"tgate": _tgate_settings(options)},
    package="tgate",
    install="tgate",
    generate=lambda target, options: functools.partial(target.tgate, **_tgate_settings(options)),
)


def _todo_factors(target: Any, options: MethodOptions) -> dict[int, float]:
    """ToDo's downsample factor by level: the top attention level, and the next one at depth 2."""
    top = _top(target)
    return {top: options.todo_factor, **({2 * top: options.todo_factor_2} if options.todo_max_depth == 2 else {})}


def _todo(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    if _transformer(target) is not None:
        if options.todo_max_depth != 1:
            raise ValueError(
                "--todo-max-depth 2 also downsamples a UNet's second level; a diffusion transformer has one"
            )
        import todo_dit

        return todo_dit.apply_todo_dit(
            target, options.todo_factor, stop_after=options.todo_stop_after, mode=options.todo_mode
        )
    import todo

    return todo.apply_todo(
        target, _todo_factors(target, options), stop_after=options.todo_stop_after, mode=options.todo_mode
    )


TODO = Part(
    _todo,
    lambda ratio, options: {
        "todo": {
            "factor": options.todo_factor,
            "max_depth": options.todo_max_depth,
            **({"factor_2": options.todo_factor_2} if options.todo_max_depth == 2 else {}),
            "stop_after": options.todo_stop_after,
            "mode": options.todo_mode,
            "levels": "from the top attention level (a diffusion transformer: every block's image attention)",
        }
    },
    tidy=False,  # its remove is exact (tests/test_todo.py)
)


def _hidiffusion(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    if getattr(target, "name_or_path", None) is None:
        raise TypeError(
            "hidiffusion picks its settings from pipe.name_or_path, which is None for a pipeline built in code: "
            "load it with from_pretrained, or set pipe.register_to_config(_name_or_path=...)"
        )
    from hidiffusion import apply_hidiffusion, remove_hidiffusion

    pipeline_class, upsamplers = type(target), target.unet.num_upsamplers

    def remove() -> None:
        remove_hidiffusion(target)  # the UNet modules' classes back and its size hook gone
        # What its remove leaves: the UNet's num_upsamplers (+12, to force explicit upsample sizes)
        # and, for ControlNet pipelines, the pipeline's class.
        target.unet.num_upsamplers = upsamplers
        target.__class__ = pipeline_class

    try:
        apply_hidiffusion(target)  # its published defaults: RAU-Net and MSW-MSA window attention
    except BaseException as error:
        remove()  # it raises after adding its hook
        if type(error) is Exception:  # its refusal of a UNet it does not recognise, as the other peers' refusals
            raise TypeError(f"hidiffusion: {error}") from error
        raise
    return remove


HIDIFFUSION = Part(
    _hidiffusion,
    lambda ratio, options: {"hidiffusion": {"apply_raunet": True, "apply_window_attn": True}},
    package="hidiffusion",
    install="hidiffusion",
)


class SkipAttention:
    """An attention processor that costs nothing (``ceiling`` only): zeros of its input's shape; for a joint
    attention layer (SD3's, Flux's double-stream: projections of their own for the text), zeros of the
    image and of the text tokens' shapes, the pair such a layer returns."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is not None and getattr(attn, "added_kv_proj_dim", None) is not None:
            return torch.zeros_like(hidden_states), torch.zeros_like(encoder_hidden_states)
        return torch.zeros_like(hidden_states)


def _ceiling(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    from todo import image_attentions

    import agentsd

    # AgentSD's default block selection, the blocks its apply_patch patches (every block of a diffusion
    # transformer); in each, the attention over the image tokens, whole (a joint layer's text rows too).
    sites = agentsd.select_blocks(target, max_downsample=agentsd.AgentSDConfig().max_downsample)
    attns = [attn for site in sites for attn, _ in image_attentions(site.module)]
    originals = [attn.processor for attn in attns]
    for attn in attns:
        attn.set_processor(SkipAttention())

    def remove() -> None:
        for attn, processor in zip(attns, originals):
            attn.set_processor(processor)

    return remove


CEILING = Part(
    _ceiling,
    lambda ratio, options: {
        "ceiling": {
            "attn1": "zeros",
            "blocks": "agentsd default (a diffusion transformer: every block's image attention)",
        }
    },
)
