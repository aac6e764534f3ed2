"""The one registry of the methods that the eval scripts and the examples compare (``speed.py``,
``fid.py``, ``examples/``).

This module holds the registry entries (:class:`Method`), the command line (``--methods`` and the
peers' knobs) and the compared variants; each library's patch is a part in ``method_parts.py``, the
peers' knobs are ``method_options.py``'s :class:`MethodOptions`.

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

The methods:

* ``sd``: nothing; the baseline every speed-up and fidelity score is relative to.
* ``tomesd``: ``tomesd.apply_patch(target, ratio=ratio, max_downsample=top)``, ``top`` being
  :func:`agentsd.top_attention_downsample` of the UNet (1 on SD 1.x/2.x, tomesd's own default; 2 on SDXL,
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
* ``ceiling`` (timing only): the blocks AgentSD patches by default (:func:`agentsd.select_blocks`), each
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
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from method_options import MethodOptions, flag  # isort: skip
from method_parts import CA_TOME, CEILING, DEEPCACHE, HIDIFFUSION, TGATE, TODO, TOMESD, agentsd_part  # isort: skip
from method_parts import Generate, Leftovers, Part, Remove  # isort: skip

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
        transformers: Also runs on diffusion transformer pipelines (SD3, Flux, PixArt); the others patch
            UNets only, and fid.py refuses them on a transformer model before loading it.
        parts: The patches, applied in this order and removed in reverse (none for the baseline).
    """

    name: str
    label: str
    summary: str
    uses_ratio: bool
    needs_pipeline: bool = False
    timing_only: bool = False
    parts: tuple[Part, ...] = ()
    transformers: bool = False

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
                leftovers = Leftovers(target) if part.tidy else None
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
        transformers=all(member.transformers for member in members),
    )


def _registry(*methods: Method) -> dict[str, Method]:
    return {method.name: method for method in methods}


_SD = Method("sd", "SD", "the unpatched pipeline (baseline)", uses_ratio=False, transformers=True)
_TOMESD = Method("tomesd", "ToMeSD", "ToMe for SD (tomesd) at the top attention level", True, parts=(TOMESD,))
_AGENTSD = Method(
    "agentsd",
    "AgentSD",
    "AgentSD, the published two-phase recipe",
    True,
    parts=(agentsd_part("agentsd"),),
    transformers=True,
)
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
        parts=(agentsd_part("agent-phase"),),
        transformers=True,
    ),
    Method(
        "tome-phase",
        "AgentSD ToMe phase",
        "AgentSD's ToMe phase (sx=sy=2, agent_ratio 0.5) at every step",
        uses_ratio=True,
        parts=(agentsd_part("tome-phase"),),
        transformers=True,
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
        transformers=True,
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
        transformers=True,
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
            flag(f.name),
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
