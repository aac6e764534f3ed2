"""The one registry of the methods that the eval scripts compare (``speed.py``, ``fid.py``).

A :class:`Method` is a registry entry: a name for ``--methods``, a one-line summary for ``--help``,
and one or more *parts*, each a library's patch with its apply and its remove. A stack
(``agentsd+deepcache``) is one entry with several parts. Use it as a context manager::

    method = resolve_methods(["agentsd"])[0]           # checked before any work, errors name the flag
    with method.applied(pipe, ratio=0.4, seed=0, options=MethodOptions()) as generate:
        images = generate(prompt=..., num_inference_steps=50).images
    # here pipe is exactly what it was, even if the block raised

``target`` is a diffusers pipeline or, for methods with ``needs_pipeline=False``, its UNet alone
(speed.py's ``unet`` mode). ``generate(**call_kwargs)`` calls the pipeline (or whatever the method
needs instead); with a UNet target there is nothing to call and the caller runs the UNet itself.

What each method does, exactly as ``speed.py`` and ``fid.py`` did before this module:

* ``sd``: nothing (the baseline every speed-up and fidelity score is relative to).
* ``tomesd``: ``tomesd.apply_patch(target, ratio=ratio, max_downsample=top level)``, where the top
  level is :func:`top_attention_downsample` of the UNet (1 on SD 1.x/2.x, tomesd's own default; 2 on
  SDXL, where tomesd's default patches nothing). Its destination choice draws on the global RNG at
  each call, so the caller seeds that (fid.py: ``torch.manual_seed(seed + first index)`` per batch).
* ``agentsd``: ``agentsd.apply_patch(target, ratio=ratio, seed=seed)``, the published two-phase
  recipe; AgentSD reseeds its own generator from ``(seed, timestep)`` at every UNet call.
* ``agent-phase`` / ``tome-phase``: AgentSD with one fixed phase for all steps (``sx = sy = 4,
  agent_ratio 0.95`` / ``sx = sy = 2, agent_ratio 0.5``): the recipe's two phases timed alone.

Removal (the context's exit) calls the library's own remove, in reverse order of application.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from importlib.util import find_spec
from typing import Any

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


@dataclass(frozen=True)
class MethodOptions:
    """The peers' own knobs, at their published defaults for SD 1.5 (flags: :func:`add_method_arguments`)."""


def top_attention_downsample(down_block_types: Sequence[str]) -> int:
    """How many times coarser than the latent the highest-resolution attention level is.

    tomesd's ``max_downsample`` defaults to 1, which patches nothing on SDXL (no attention at the
    top level); passing this value makes it patch the same level as AgentSD's default.
    """
    first = next(i for i, block in enumerate(down_block_types) if "CrossAttn" in block)
    return 2**first


def _unet(target: Any) -> Any:
    return getattr(target, "unet", target)


# --------------------------------------------------------------------------------------------------
# Parts: one library's patch each
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One library's patch: how to apply it (returning its remove) and the settings that shape its output.

    Attributes:
        package: Import name of the library (``None``: this repository's own ``agentsd``).
        pip: What to install when ``package`` is missing.
        apply: ``apply(target, ratio, seed, options) -> remove``.
        settings: ``settings(ratio, options) -> dict``, JSON-able.
    """

    package: str | None
    pip: str | None
    apply: Callable[[Any, float | None, int, MethodOptions], Remove]
    settings: Callable[[float | None, MethodOptions], dict[str, Any]]

    def unavailable(self) -> str | None:
        if self.package is not None and find_spec(self.package) is None:
            return f"the {self.package} package is not installed: pip install {self.pip}"
        return None


def _tomesd_apply(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
    import tomesd

    max_downsample = top_attention_downsample(_unet(target).config.down_block_types)
    tomesd.apply_patch(target, ratio=ratio, max_downsample=max_downsample)
    return lambda: tomesd.remove_patch(target)


TOMESD = Part(
    package="tomesd",
    pip="tomesd",
    apply=_tomesd_apply,
    settings=lambda ratio, options: {"tomesd": {"max_downsample": "top attention level"}},
)


def _agentsd_part(name: str) -> Part:
    def apply(target: Any, ratio: float | None, seed: int, options: MethodOptions) -> Remove:
        import agentsd

        agentsd.apply_patch(target, ratio=ratio, seed=seed, **AGENTSD_KWARGS[name])
        return lambda: agentsd.remove_patch(target)

    return Part(
        package=None, pip=None, apply=apply, settings=lambda ratio, options: {"agentsd": dict(AGENTSD_KWARGS[name])}
    )


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
        needs_pipeline: Needs a diffusers pipeline (its scheduler, or its own denoising loop), not a
            bare UNet: speed.py's ``unet`` mode cannot time it.
        timing_only: Its output is meaningless (a speed ceiling): speed only, fid.py refuses it.
        parts: The patches applied in this order (none for the baseline) and removed in reverse.
    """

    name: str
    label: str
    summary: str
    uses_ratio: bool
    needs_pipeline: bool = False
    timing_only: bool = False
    parts: tuple[Part, ...] = ()

    def unavailable(self) -> str | None:
        """Why this method cannot run here (a package missing or incompatible), else ``None``."""
        reasons = [reason for part in self.parts if (reason := part.unavailable())]
        return "; ".join(dict.fromkeys(reasons)) or None

    def settings(self, ratio: float | None, options: MethodOptions | None = None) -> dict[str, Any]:
        """A JSON-able record of everything that shapes this method's output (round-tripped through JSON,
        so that it compares equal to a record read back from a file)."""
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
        """Apply this method to ``target`` (a pipeline or a UNet) for the block; removed on exit, even on error.

        Yields ``generate(**call_kwargs)``, which runs the patched pipeline.
        """
        self._check_ratio(ratio)
        reason = self.unavailable()
        if reason is not None:
            raise RuntimeError(f"method {self.name!r} cannot run here: {reason}")
        options = options or MethodOptions()
        removes: list[Remove] = []
        try:
            for part in self.parts:
                removes.append(part.apply(target, ratio, seed, options))
            yield lambda **call_kwargs: target(**call_kwargs)
        finally:
            for remove in reversed(removes):
                remove()

    def _check_ratio(self, ratio: float | None) -> None:
        if self.uses_ratio and ratio is None:
            raise ValueError(f"method {self.name!r} takes a merge ratio; got ratio=None")
        if not self.uses_ratio and ratio is not None:
            raise ValueError(f"method {self.name!r} takes no merge ratio; got ratio={ratio!r}")


def _registry(*methods: Method) -> dict[str, Method]:
    return {method.name: method for method in methods}


#: Every compared method, in display order.
METHODS: dict[str, Method] = _registry(
    Method("sd", "SD", "the unpatched pipeline (baseline)", uses_ratio=False),
    Method("tomesd", "ToMeSD", "ToMe for SD (tomesd) at the top attention level", uses_ratio=True, parts=(TOMESD,)),
    Method("agentsd", "AgentSD", "AgentSD, the published two-phase recipe", True, parts=(_agentsd_part("agentsd"),)),
    Method(
        "agent-phase",
        "AgentSD agent phase",
        "AgentSD's agent phase (sx=sy=4, agent_ratio 0.95) at every step",
        uses_ratio=True,
        parts=(_agentsd_part("agent-phase"),),
    ),
    Method(
        "tome-phase",
        "AgentSD ToMe phase",
        "AgentSD's ToMe phase (sx=sy=2, agent_ratio 0.5) at every step",
        uses_ratio=True,
        parts=(_agentsd_part("tome-phase"),),
    ),
)
BASELINE = METHODS["sd"]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _names(timing: bool) -> list[str]:
    return [name for name, method in METHODS.items() if timing or not method.timing_only]


def add_method_arguments(parser: argparse.ArgumentParser, *, default: Sequence[str], timing: bool = True) -> None:
    """Add ``--methods`` (its help lists every name with its summary) and the peers' knobs.

    ``timing=False`` (fid.py) leaves the timing-only methods out of the help. Names are checked by
    :func:`resolve_methods`, so that an unknown or unavailable one fails with the reason.
    """
    listing = "; ".join(f"{name}: {METHODS[name].summary}" for name in _names(timing))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(default),
        metavar="NAME",
        help=f"methods to compare, space or comma separated (default: {' '.join(default)}). {listing}",
    )


def options_from(args: argparse.Namespace) -> MethodOptions:
    """The :class:`MethodOptions` that the flags of :func:`add_method_arguments` chose."""
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
    """The baseline first (if among ``methods``), the methods without a ratio, then the others at every ratio."""
    first = [Variant(m) for m in methods if not m.uses_ratio]
    others = [Variant(m, r) for r in dict.fromkeys(ratios) for m in methods if m.uses_ratio]
    return sorted(first, key=lambda v: v.method is not BASELINE) + others
