"""The peers' knobs: :class:`MethodOptions`, one ``--flag`` each, at their published defaults for SD 1.5.

``methods.add_method_arguments`` adds them to a script's parser and ``methods.options_from`` reads
them back, each error naming its flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: The cache checkpoint lists of ``ca_tome.CacheConf`` (0.1.3), by name.
CA_TOME_CACHES = ("CONFIG_1", "CONFIG_2", "CONFIG_3", "CONFIG_4", "ADAPTIVE", "CONFIG_Five")
#: The ``F.interpolate`` modes ToDo can downsample with (``area``: the mean of each factor-by-factor cell).
TODO_MODES = ("nearest-exact", "nearest", "bilinear", "bicubic", "area")


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
            value, meta, name = getattr(self, f.name), f.metadata, flag(f.name)
            kinds = (int, float) if isinstance(f.default, float) else (type(f.default),)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"{name}: expected {kinds[-1].__name__}, got {value!r}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ValueError(f"{name}: choose from {', '.join(meta['choices'])}; got {value!r}")
            if meta["min"] is not None and value < meta["min"] or meta["max"] is not None and value > meta["max"]:
                bounds = f"in [{meta['min']}, {meta['max']}]" if meta["max"] is not None else f">= {meta['min']}"
                raise ValueError(f"{name}: must be {bounds}, got {value!r}")


def flag(option: str) -> str:
    """The command-line flag of an option: ``todo_factor`` -> ``--todo-factor``."""
    return "--" + option.replace("_", "-")
