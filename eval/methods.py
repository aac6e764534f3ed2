"""The one registry of the methods that the eval scripts compare (``speed.py``, ``fid.py``).

A :class:`Method` is a registry entry: a name for ``--methods``, a one-line summary for ``--help``,
and one or more *parts*, each one library's patch with its apply and its remove. A stack
(``agentsd+deepcache``) is one entry whose parts are those of its members. A script uses it so::

    add_method_arguments(parser, default=["sd", "tomesd", "agentsd"])     # --methods and the peers' knobs
    try:                                                                  # before any model is built
        methods, options = resolve_methods(args.methods), options_from(args)
    except ValueError as error:                                           # names the flag and the reason
        parser.error(str(error))
    for variant in variants(methods, args.ratios):
        with variant.method.applied(pipe, ratio=variant.ratio, seed=seed, options=options) as generate:
            images = generate(prompt=..., num_inference_steps=50).images
        # here pipe is what it was before, even if the block raised

``target`` is a diffusers pipeline or, for a method with ``needs_pipeline=False``, a bare UNet
(speed.py's ``unet`` mode: it then runs the UNet itself and ignores ``generate``). ``generate``
calls the pipeline as the method needs it called: ``pipe(**kw)``, or ``pipe.tgate(**kw, gate_step=...)``
for T-GATE and ``pipe.call(**kw)`` for CA-ToMe, whose libraries bring their own denoising loops.

The methods, as ``speed.py`` and ``fid.py`` ran the first five before this module:

* ``sd``: nothing; the baseline every speed-up and fidelity score is relative to.
* ``tomesd``: ``tomesd.apply_patch(target, ratio=ratio, max_downsample=top)``, ``top`` being
  :func:`top_attention_downsample` of the UNet (1 on SD 1.x/2.x, tomesd's own default; 2 on SDXL,
  where tomesd's default would patch nothing).
* ``agentsd``: ``agentsd.apply_patch(target, ratio=ratio, seed=seed)``, the published two-phase recipe.
* ``agent-phase`` / ``tome-phase``: AgentSD with one fixed phase for all steps (``sx = sy = 4,
  agent_ratio 0.95`` / ``sx = sy = 2, agent_ratio 0.5``): the recipe's two phases timed alone.
* ``ca-tome``: CA-ToMe 0.1.3 as its ``apply_CA_ToMe`` sets it up (its UNet forward and its ``call``
  loop, which pass the step index to the blocks), with the similarity threshold (``r``, 0.7) and
  cache checkpoints (``CONFIG_3``) of its best published SD 1.5 row, at the top attention level.
  No merge ratio: the threshold decides how many tokens merge. Only ``StableDiffusionPipeline``.
* ``deepcache``: DeepCache 0.1.1's ``DeepCacheSDHelper`` with ``cache_interval=3, cache_branch_id=0``
  (its published SD 1.5 settings). It needs ``target.unet`` and ``target.scheduler`` (a pipeline,
  or any object with both, for a script's own loop) and finds the step from the timestep, which the
  UNet must receive as its second positional argument, a tensor taken from ``scheduler.timesteps``.
* ``todo``: ToDo, token downsampling (Smith et al. 2024), written here in ``todo.py`` from the paper:
  in ``attn1`` at the top attention level every query is kept, and keys and values are computed from
  the token grid downsampled with ``F.interpolate`` (``--todo-factor 2``, ``--todo-mode nearest-exact``).
  ``--todo-max-depth 2`` also downsamples the next level (by ``--todo-factor-2``, as the reference's
  ``downsample_factor_level_2``); ``--todo-stop-after f`` keeps it on while ``t >= (1 - f) T``, the
  noise level as the authors' reference uses (default 1: every step). No ratio; a bare UNet will do.
* ``hidiffusion``: HiDiffusion 0.1.10, ``apply_hidiffusion(pipe)`` at its defaults (RAU-Net and
  MSW-MSA window attention) and ``remove_hidiffusion(pipe)``. It recognises SD 1.5/2.1/XL by their
  module names (any other UNet: TypeError), takes its settings from ``pipe.name_or_path`` (refused
  when ``None``) and reads ``pipe._num_timesteps``: a pipeline only. It imports
  ``diffusers.pipelines.controlnet.multicontrolnet``, removed in diffusers 0.41, so there it is
  listed but unavailable (BENCHMARKS.md).
* ``tgate``: T-GATE 1.0.0 (``TgateSDLoader`` / ``TgateSDXLLoader``) at its published defaults
  (``gate_step=10, sp_interval=5, fi_interval=1, warm_up=2``). After the gate step its loop drops
  classifier-free guidance and reuses the cached cross-attention. Its attention forward replaces
  the processors, so it does not stack with token merging.
* ``agentsd+deepcache`` / ``tomesd+deepcache``: both parts, token merging applied first (the order
  does not change the output: the tests check it). DeepCache's cached steps still run the last
  up-block layer at full latent resolution, which is where AgentSD and tomesd merge.
* ``ceiling`` (timing only): the blocks AgentSD patches by default (its ``patch_summary``), each
  with its self-attention ``attn1`` returning zeros of its input's shape: top-level self-attention
  at zero cost, the limit of what any attention speed-up there can reach. Its images are meaningless.

Randomness: AgentSD draws its destinations from a hash of ``(seed, timestep, block)``, no generator. tomesd
and CA-ToMe fork the global RNG at their first UNet call after being applied, so a caller that
wants the same images again seeds the global RNG before applying (fid.py seeds it with ``--seed`` before every batch).

Removal (the context's exit) runs each library's own remove, in reverse order of application.
DeepCache, T-GATE, CA-ToMe, tomesd and HiDiffusion leave attributes behind (``forward`` wrappers and
caches on modules, ``pipe.tgate``, ``pipe.call``, ``_tome_info``, ``info``); those a part added to the
pipeline or to the UNet's modules are deleted after its remove, and a replaced ``forward`` is put
back, so the pipeline is left as it was (HiDiffusion's part also undoes its ``num_upsamplers + 12``
and, on ControlNet pipelines, the pipeline's class). AgentSD's ``remove_patch`` and ToDo's remove
are exact and tested in their own tests.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Any

import torch

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
#: The cache checkpoint lists of ``ca_tome.CacheConf`` (0.1.3), by name.
CA_TOME_CACHES = ("CONFIG_1", "CONFIG_2", "CONFIG_3", "CONFIG_4", "ADAPTIVE", "CONFIG_Five")
#: The ``F.interpolate`` modes ToDo can downsample with (``area``: the mean of each factor-by-factor cell).
TODO_MODES = ("nearest-exact", "nearest", "bilinear", "bicubic", "area")


# --------------------------------------------------------------------------------------------------
# Options: the peers' knobs
# --------------------------------------------------------------------------------------------------


def _knob(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None, choices=None):
    return field(default=default, metadata={"help": help, "min": minimum, "max": maximum, "choices": choices})


@dataclass(frozen=True)
class MethodOptions:
    """The peers' own knobs, at their published defaults for SD 1.5; each is a flag (``--deepcache-interval``).

    Raises:
        ValueError: naming the flag, for a value out of range.
    """

    deepcache_interval: int = _knob(
        3, "DeepCache: run the whole UNet every N steps, reuse deep features between", minimum=1
    )
    deepcache_branch: int = _knob(
        0, "DeepCache: cache_branch_id, the skip branch below which features are reused", minimum=0
    )
    tgate_gate_step: int = _knob(10, "T-GATE: step from which the cached cross-attention is reused", minimum=1)
    tgate_sp_interval: int = _knob(5, "T-GATE: self-attention cache interval before the gate step", minimum=1)
    tgate_fi_interval: int = _knob(1, "T-GATE: self-attention cache interval after the gate step", minimum=1)
    tgate_warm_up: int = _knob(2, "T-GATE: first steps without any caching", minimum=0)
    ca_tome_threshold: float = _knob(0.7, "CA-ToMe: cosine similarity above which tokens merge", minimum=-1, maximum=1)
    ca_tome_cache: str = _knob(
        "CONFIG_3", "CA-ToMe: ca_tome.CacheConf steps where merge pairs are recomputed", choices=CA_TOME_CACHES
    )
    todo_factor: float = _knob(
        2.0, "ToDo: keys and values from the grid downsampled by this factor at the top attention level", minimum=1
    )
    todo_max_depth: int = _knob(
        1,
        "ToDo: attention levels downsampled from the top (2: also the next level, by --todo-factor-2)",
        minimum=1,
        maximum=2,
    )
    todo_factor_2: float = _knob(2.0, "ToDo: downsample factor at the second level (--todo-max-depth 2)", minimum=1)
    todo_stop_after: float = _knob(
        1.0,
        "ToDo: on for this fraction of the denoising, while t >= (1 - f) * num_train_timesteps",
        minimum=0,
        maximum=1,
    )
    todo_mode: str = _knob("nearest-exact", "ToDo: F.interpolate mode of the downsampling", choices=TODO_MODES)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta, flag = getattr(self, f.name), f.metadata, _flag(f.name)
            kinds = (int, float) if isinstance(f.default, float) else (type(f.default),)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"{flag}: expected {kinds[-1].__name__}, got {value!r}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ValueError(f"{flag}: choose from {', '.join(meta['choices'])}; got {value!r}")
            if meta["min"] is not None and value < meta["min"] or meta["max"] is not None and value > meta["max"]:
                bounds = f"in [{meta['min']}, {meta['max']}]" if meta["max"] is not None else f">= {meta['min']}"
                raise ValueError(f"{flag}: must be {bounds}, got {value!r}")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


# --------------------------------------------------------------------------------------------------
# Parts: one library's patch each
# --------------------------------------------------------------------------------------------------


def top_attention_downsample(down_block_types: Sequence[str]) -> int:
    """How many times coarser than the latent the highest-resolution attention level is.

    tomesd's ``max_downsample`` defaults to 1, which patches nothing on SDXL (no attention at the
    top level); passing this value makes it patch the same level as AgentSD's default.
    """
    first = next(i for i, block in enumerate(down_block_types) if "CrossAttn" in block)
    return 2**first


def _unet(target: Any) -> torch.nn.Module:
    return getattr(target, "unet", target)


def _top(target: Any) -> int:
    return top_attention_downsample(_unet(target).config.down_block_types)


def _require_pipeline(target: Any, method: str, *classes: str) -> None:
    """Refuse, before any change, a target that is not one of the diffusers pipeline ``classes``."""
    import diffusers

    if not isinstance(target, tuple(getattr(diffusers, name) for name in classes)):
        raise TypeError(f"{method} needs a diffusers {' or '.join(classes)}, got {type(target).__name__}")


@functools.cache
def _import_problem(package: str, install: str) -> str | None:
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


class _Leftovers:
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
        tidy: Drop what the library's remove leaves behind (see :class:`_Leftovers`).
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
        return None if self.package is None else _import_problem(self.package, self.install)


def _tomesd(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    import tomesd

    tomesd.apply_patch(target, ratio=ratio, max_downsample=_top(target))
    return lambda: tomesd.remove_patch(target)


TOMESD = Part(
    _tomesd,
    lambda ratio, options: {"tomesd": {"max_downsample": "top attention level"}},
    package="tomesd",
    install="tomesd",
)


def _agentsd(name: str) -> Part:
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
            "levels": "from the top attention level",
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
    """An attention processor that costs nothing: zeros of its input's shape (``ceiling`` only)."""

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _ceiling(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    import agentsd

    unet = _unet(target)
    if agentsd.is_patched(unet):
        raise ValueError("ceiling finds its blocks with a trial AgentSD patch; remove the AgentSD patch first")
    agentsd.apply_patch(unet)  # its default block selection, then gone again: the blocks are all we want
    names = [block.name for block in agentsd.patch_summary(unet).blocks]
    agentsd.remove_patch(unet)
    attns = [unet.get_submodule(name).attn1 for name in names]
    originals = [attn.processor for attn in attns]
    for attn in attns:
        attn.set_processor(SkipAttention())

    def remove() -> None:
        for attn, processor in zip(attns, originals):
            attn.set_processor(processor)

    return remove


CEILING = Part(_ceiling, lambda ratio, options: {"ceiling": {"attn1": "zeros", "blocks": "agentsd default"}})


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A registry entry: what ``--methods NAME`` runs.

    Attributes:
        name: The registry key.
        label: Display name in tables and plots.
        summary: One line, shown in ``--help``.
        uses_ratio: Takes the merge ratio (its variants are named ``name-r{ratio:g}``).
        needs_pipeline: Needs a pipeline (its scheduler, or its own denoising loop), not a bare UNet:
            speed.py's ``unet`` mode cannot time it.
        timing_only: Its output is meaningless (a speed limit): speed only, fid.py refuses it.
        parts: The patches, applied in this order and removed in reverse (none for the baseline).
    """

    name: str
    label: str
    summary: str
    uses_ratio: bool
    needs_pipeline: bool = False
    timing_only: bool = False
    parts: tuple[Part, ...] = ()

    @property
    def batch_dependent(self) -> bool:
        """Whether its images depend on the batch they ran in (a resume must keep the batch size)."""
        return any(part.batch_dependent for part in self.parts)

    @property
    def compile_whole(self) -> Callable[[Any, dict[str, Any]], None] | None:
        """How this method's patched UNet is compiled whole, if its one library has its own way (see :class:`Part`)."""
        return self.parts[0].compile_whole if len(self.parts) == 1 else None

    @property
    def packages(self) -> tuple[str, ...]:
        """The distributions whose versions shape this method's output (for a report's versions)."""
        return tuple(dict.fromkeys(part.distribution for part in self.parts))

    def unavailable(self) -> str | None:
        """Why this method cannot run here (a package missing, or failing with this diffusers), else ``None``."""
        reasons = [reason for part in self.parts if (reason := part.unavailable())]
        return "; ".join(dict.fromkeys(reasons)) or None

    def settings(self, ratio: float | None, options: MethodOptions | None = None) -> dict[str, Any]:
        """A JSON-able record of everything that shapes this method's output.

        Round-tripped through JSON, so that it compares equal to the same record read back from a file.
        """
        self._check_ratio(ratio)
        options = options or MethodOptions()
        record: dict[str, Any] = {"method": self.name, "ratio": ratio}
        for part in self.parts:
            record.update(part.settings(ratio, options))
        return json.loads(json.dumps(record))

    @contextmanager
    def applied(
        self, target: Any, *, ratio: float | None = None, seed: int = 0, options: MethodOptions | None = None
    ) -> Iterator[Generate]:
        """Apply this method to ``target`` (a pipeline, or a UNet) for the block; removed on exit, even on error.

        Yields ``generate(**call_kwargs)``, which runs the patched pipeline.

        Raises:
            ValueError: a ratio given to a method without one, or missing for one with one.
            RuntimeError: the method cannot run here (:meth:`unavailable`).
            TypeError: a target the method cannot patch (a UNet where it needs a pipeline).
        """
        self._check_ratio(ratio)
        reason = self.unavailable()
        if reason is not None:
            raise RuntimeError(f"method {self.name!r} cannot run here: {reason}")
        if self.needs_pipeline and not hasattr(target, "unet"):
            raise TypeError(f"method {self.name!r} needs a pipeline, not a bare {type(target).__name__}")
        options = options or MethodOptions()
        removes: list[Remove] = []
        try:
            generate: Generate = target
            for part in self.parts:
                leftovers = _Leftovers(target) if part.tidy else None
                try:
                    remove = part.apply(target, ratio, seed, options)
                except BaseException:
                    if leftovers is not None:
                        leftovers.drop()
                    raise
                removes.append(remove if leftovers is None else _then(remove, leftovers.drop))
                if part.generate is not None:
                    generate = part.generate(target, options)
            yield generate
        finally:
            for remove in reversed(removes):
                remove()

    def _check_ratio(self, ratio: float | None) -> None:
        if self.uses_ratio and ratio is None:
            raise ValueError(f"method {self.name!r} takes a merge ratio; got ratio=None")
        if not self.uses_ratio and ratio is not None:
            raise ValueError(f"method {self.name!r} takes no merge ratio; got ratio={ratio!r}")


def _then(first: Remove, second: Remove) -> Remove:
    def both() -> None:
        try:
            first()
        finally:
            second()

    return both


def _stack(*members: Method) -> Method:
    """One method applying ``members``' parts in order (at most one of them with its own loop)."""
    parts = tuple(part for member in members for part in member.parts)
    assert sum(part.generate is not None for part in parts) <= 1, "two denoising loops cannot stack"
    return Method(
        name="+".join(member.name for member in members),
        label=" + ".join(member.label for member in members),
        summary=" stacked with ".join(member.label for member in members) + " (either order gives the same output)",
        uses_ratio=any(member.uses_ratio for member in members),
        needs_pipeline=any(member.needs_pipeline for member in members),
        parts=parts,
    )


def _registry(*methods: Method) -> dict[str, Method]:
    return {method.name: method for method in methods}


_SD = Method("sd", "SD", "the unpatched pipeline (baseline)", uses_ratio=False)
_TOMESD = Method("tomesd", "ToMeSD", "ToMe for SD (tomesd) at the top attention level", True, parts=(TOMESD,))
_AGENTSD = Method("agentsd", "AgentSD", "AgentSD, the published two-phase recipe", True, parts=(_agentsd("agentsd"),))
_DEEPCACHE = Method(
    "deepcache",
    "DeepCache",
    "DeepCache: deep UNet features reused between full steps (--deepcache-*; needs the pipeline)",
    uses_ratio=False,
    needs_pipeline=True,
    parts=(DEEPCACHE,),
)

#: Every compared method, in display order.
METHODS: dict[str, Method] = _registry(
    _SD,
    _TOMESD,
    _AGENTSD,
    Method(
        "agent-phase",
        "AgentSD agent phase",
        "AgentSD's agent phase (sx=sy=4, agent_ratio 0.95) at every step",
        uses_ratio=True,
        parts=(_agentsd("agent-phase"),),
    ),
    Method(
        "tome-phase",
        "AgentSD ToMe phase",
        "AgentSD's ToMe phase (sx=sy=2, agent_ratio 0.5) at every step",
        uses_ratio=True,
        parts=(_agentsd("tome-phase"),),
    ),
    Method(
        "ca-tome",
        "CA-ToMe",
        "CA-ToMe: ToMe above a similarity threshold, pairs cached across steps (--ca-tome-*; no ratio; SD 1.x/2.x)",
        uses_ratio=False,
        needs_pipeline=True,
        parts=(CA_TOME,),
    ),
    _DEEPCACHE,
    Method(
        "todo",
        "ToDo",
        "ToDo: attn1 keys and values from the token grid downsampled at the top attention level (--todo-*)",
        uses_ratio=False,
        parts=(TODO,),
    ),
    Method(
        "hidiffusion",
        "HiDiffusion",
        "HiDiffusion: RAU-Net resolution-aware UNet and MSW-MSA window attention (SD 1.5/2.1/XL; needs the pipeline)",
        uses_ratio=False,
        needs_pipeline=True,
        parts=(HIDIFFUSION,),
    ),
    Method(
        "tgate",
        "T-GATE",
        "T-GATE: cross-attention cached and guidance dropped after the gate step (--tgate-*; needs the pipeline)",
        uses_ratio=False,
        needs_pipeline=True,
        parts=(TGATE,),
    ),
    _stack(_AGENTSD, _DEEPCACHE),
    _stack(_TOMESD, _DEEPCACHE),
    Method(
        "ceiling",
        "ceiling",
        "timing only: AgentSD's blocks with self-attention at zero cost (the limit of any attention speed-up)",
        uses_ratio=False,
        timing_only=True,
        parts=(CEILING,),
    ),
)
BASELINE = METHODS["sd"]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _names(timing: bool) -> list[str]:
    return [name for name, method in METHODS.items() if timing or not method.timing_only]


def add_method_arguments(parser: argparse.ArgumentParser, *, default: Sequence[str], timing: bool = True) -> None:
    """Add ``--methods`` (its help lists every name with its summary, and the default) and the peers' knobs.

    ``timing=False`` (fid.py) leaves the timing-only methods out. Names are checked by
    :func:`resolve_methods` and knob values by :func:`options_from`, each error naming its flag.
    """
    listing = "; ".join(f"{name}: {METHODS[name].summary}" for name in _names(timing))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(default),
        metavar="NAME",
        # "%(default).0s" prints nothing; it only keeps ArgumentDefaultsHelpFormatter from adding the list's repr.
        help=f"methods to compare, space or comma separated (default: {' '.join(default)}%(default).0s). {listing}",
    )
    group = parser.add_argument_group("method settings (the peers' published defaults for SD 1.5)")
    for f in fields(MethodOptions):
        choices = f.metadata["choices"]
        group.add_argument(
            _flag(f.name),
            type=type(f.default),
            default=f.default,
            choices=choices,
            metavar="NAME" if choices else type(f.default).__name__.upper(),
            help=f"{f.metadata['help']}{', one of %(choices)s' if choices else ''} (default: %(default)s)",
        )


def options_from(args: argparse.Namespace) -> MethodOptions:
    """The :class:`MethodOptions` that the flags of :func:`add_method_arguments` chose (ValueError naming a flag)."""
    return MethodOptions(**{f.name: getattr(args, f.name) for f in fields(MethodOptions)})


def resolve_methods(names: Sequence[str], *, flag: str = "--methods", timing: bool = True) -> list[Method]:
    """The methods named (comma or space separated, repeats dropped, order kept), checked before any work.

    Raises:
        ValueError: naming ``flag``, for an unknown name (with the accepted ones), a method that
            cannot run here (with why), or a timing-only method where ``timing`` is false.
    """
    accepted = _names(timing)
    wanted = list(dict.fromkeys(n.strip() for item in names for n in item.split(",") if n.strip()))
    if not wanted:
        raise ValueError(f"{flag}: name at least one method; choose from {', '.join(accepted)}")
    for name in wanted:
        if name not in METHODS:
            raise ValueError(f"{flag}: unknown method {name!r}; choose from {', '.join(accepted)}")
        if name not in accepted:
            raise ValueError(
                f"{flag}: {name!r} only measures speed (its images are meaningless); choose from {', '.join(accepted)}"
            )
        reason = METHODS[name].unavailable()
        if reason is not None:
            raise ValueError(f"{flag}: method {name!r} cannot run here: {reason}")
    return [METHODS[name] for name in wanted]


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compared configuration: a method, at one merge ratio if it takes one."""

    method: Method
    ratio: float | None = None

    @property
    def name(self) -> str:
        return self.method.name if self.ratio is None else f"{self.method.name}-r{self.ratio:g}"

    @property
    def label(self) -> str:
        return self.method.label if self.ratio is None else f"{self.method.label} r={self.ratio:g}"


def variants(methods: Sequence[Method], ratios: Sequence[float]) -> list[Variant]:
    """The baseline first (if among ``methods``), the other methods without a ratio, then the rest at every ratio."""
    first = [Variant(m) for m in methods if not m.uses_ratio]
    others = [Variant(m, r) for r in dict.fromkeys(ratios) for m in methods if m.uses_ratio]
    return sorted(first, key=lambda v: v.method is not BASELINE) + others
