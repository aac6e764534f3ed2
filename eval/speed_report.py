"""Reporting of eval/speed.py: the result rows, their table, and speed.json / speed.csv / speedup.png.

Every file is written whole or not at all (:func:`atomic_write.atomic_path`), after every workload,
so that a stopped run keeps what it measured and a reader never sees half a file.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atomic_write import atomic_path  # isort: skip
from timing import busy  # isort: skip
from measure import compiled_with  # isort: skip
from workloads import HIRES_RECIPE_NOTE, Workload  # isort: skip

if TYPE_CHECKING:
    from measure import Measurement
    from methods import Variant
    from settings import PlannedRun, SpeedSettings

MIB = 2**20

MEMORY_SOURCES = {"cuda": "torch.cuda allocator statistics", "cpu": "torch.profiler tensor events"}


@dataclass
class Row:
    """One line of the results: a variant on one workload, with ratios to the baseline (``--baseline``).

    ``ceiling_speedup`` is the ceiling's speed-up on the same workload, where it was timed, and
    ``of_the_way`` how far this variant gets from the baseline towards it:
    ``(t_baseline - t) / (t_baseline - t_ceiling)``. ``load`` is the highest 1-minute load average
    read after this variant's timed calls (``None`` where the OS has none). ``compile`` is the run's
    compile mode (tables are grouped by it), ``compiled_with`` what compiled this variant's UNet
    (:func:`measure.compiled_with`: ``agentsd.compile_unet`` for AgentSD's methods whole-model compiled).
    """

    source: str
    compile: str
    mode: str
    unit: str
    resolution: int
    steps: int | None
    method: str
    ratio: float | None
    baseline: str
    median_s: float
    min_s: float
    max_s: float
    speedup: float
    ceiling_speedup: float | None
    of_the_way: float | None
    load: float | None
    peak_mib_per_image: float | None
    memory_vs_baseline: float | None
    compiles: int | None
    graph_breaks: int | None
    note: str | None
    seconds: list[float]
    compiled_with: str | None = None


def rows_for(run: PlannedRun, workload: Workload, results: dict[Variant, Measurement], baseline_name: str) -> list[Row]:
    """One row per variant of ``results`` on ``workload``: seconds per unit, speed-up over ``baseline_name``,
    how far towards the ceiling (where it was timed), peak memory per image."""
    unit, per = workload.unit
    base = next(result for variant, result in results.items() if variant.method.name == baseline_name)
    baseline = statistics.median(base.seconds) / per
    # The ceiling (self-attention of the patched blocks for free), where it was timed: how far each
    # method gets from the baseline towards it.
    top = next((statistics.median(r.seconds) / per for v, r in results.items() if v.method.name == "ceiling"), None)
    rows = []
    for variant, result in results.items():
        seconds = [s / per for s in result.seconds]
        median = statistics.median(seconds)
        peak = None if result.peak_bytes is None else result.peak_bytes / workload.images / MIB
        note = result.note
        if workload.mode == "hires" and "agentsd" in variant.method.name.split("+"):
            note = HIRES_RECIPE_NOTE
        rows.append(
            Row(
                source=run.source,
                compile=run.compile,
                mode=workload.mode,
                unit=unit,
                resolution=workload.resolution,
                steps=None if workload.mode == "unet" else workload.steps,
                method=variant.name,
                ratio=variant.ratio,
                baseline=baseline_name,
                median_s=median,
                min_s=min(seconds),
                max_s=max(seconds),
                speedup=baseline / median,
                ceiling_speedup=None if top is None else baseline / top,
                of_the_way=None if top is None or top >= baseline else (baseline - median) / (baseline - top),
                load=max(result.loads, default=None),
                peak_mib_per_image=peak,
                memory_vs_baseline=None if peak is None or not base.peak_bytes else result.peak_bytes / base.peak_bytes,
                compiles=result.compiles,
                graph_breaks=result.graph_breaks,
                note=note,
                seconds=seconds,
                compiled_with=compiled_with(variant.method, run.compile),
            )
        )
    return rows


def _group(row: Row) -> tuple[str, str, str]:
    return row.source, row.compile, row.mode


#: What each mode times, in table titles.
MODE_TITLES = {
    "unet": "one forward",
    "pipeline": "whole generation",
    "hires": "hires pass (image-to-image from an upscaled latent)",
}
#: Timed calls whose max and min differ by more than this share of their median are too noisy to rank by.
SPREAD_LIMIT = 0.10


def _group_title(group: tuple[str, str, str]) -> str:
    source, compile_mode, mode = group
    what = MODE_TITLES[mode]
    return f"{source}, {what}, " + ("eager" if compile_mode == "none" else f"compile {compile_mode}")


def format_table(rows: Sequence[Row]) -> str:
    """One table per source, compile mode and mode; a blank line between resolutions."""
    text: list[str] = []
    for group, members in itertools.groupby(rows, key=_group):
        members = list(members)
        compiled = group[1] != "none"
        ceiling = any(row.ceiling_speedup is not None for row in members)
        header = ("px", "method", "median", "min-max", f"vs {members[0].baseline}")
        header += ("of the way to the ceiling",) if ceiling else ()
        header += ("peak MiB/img", "mem ratio")
        header += ("compiles", "breaks", "compiled with") if compiled else ()
        lines = [header]
        for row in members:
            lines.append(
                (
                    str(row.resolution) + ("" if row.steps is None else f" x{row.steps}"),
                    row.method,
                    f"{row.median_s:.3f} {row.unit}",
                    f"{row.min_s:.3f}-{row.max_s:.3f}",
                    f"{row.speedup:.2f}x",
                )
                + ((_of_the_way(row),) if ceiling else ())
                + (
                    "n/a" if row.peak_mib_per_image is None else f"{row.peak_mib_per_image:.1f}",
                    "n/a" if row.memory_vs_baseline is None else f"{row.memory_vs_baseline:.2f}x",
                )
                + ((str(row.compiles), str(row.graph_breaks), str(row.compiled_with)) if compiled else ())
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text += ["", _group_title(group)]
        for index, line in enumerate(lines):
            if index > 1 and line[0] != lines[index - 1][0]:
                text.append("")
            text.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        text += [f"  note: {row.method} at {row.resolution} px: {row.note}" for row in members if row.note]
    return "\n".join(text[1:])


def _of_the_way(row: Row) -> str:
    if row.ceiling_speedup is None:
        return "n/a"
    if row.of_the_way is None:  # the ceiling was no faster than the baseline
        return f"n/a (ceiling {row.ceiling_speedup:.2f}x)"
    return f"{row.of_the_way:.0%} of {row.ceiling_speedup:.2f}x"


def noise_warnings(rows: Sequence[Row], cpus: int) -> list[str]:
    """Why some figures are not to be trusted: a busy machine while they were timed (:func:`busy`:
    threads waited for a core), or repeats that disagree (spread over
    :data:`SPREAD_LIMIT` of the median). Empty when neither happened."""
    warnings = []
    groups = list(dict.fromkeys(_group_title(_group(row)) for row in rows))
    loaded = [row for row in rows if busy(row.load, cpus)]
    if loaded:
        tables = list(dict.fromkeys(_group_title(_group(row)) for row in loaded))
        warnings.append(
            f"load average up to {max(row.load for row in loaded):.1f} on {cpus} CPUs while timing "
            f"{'every table' if tables == groups else '; '.join(tables)} (this run's own threads included): "
            "other work competed for the cores"
        )
    for group, members in itertools.groupby(rows, key=_group):
        members = list(members)
        where = _group_title(group)
        spreads = [(row, (row.max_s - row.min_s) / row.median_s) for row in members if len(row.seconds) > 1]
        noisy = [f"{row.method} at {row.resolution} px {share:.0%}" for row, share in spreads if share > SPREAD_LIMIT]
        if noisy:
            warnings.append(
                f"{where}: timed calls spread over {SPREAD_LIMIT:.0%} of their median ((max - min) / median: "
                f"{', '.join(noisy)}); rerun on a quiet machine before comparing"
            )
    return warnings


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        module = sys.modules.get(package)
        return getattr(module, "__version__", None)


def machine_info(device: torch.device, argv: Sequence[str]) -> dict[str, Any]:
    """What a reader needs to reproduce or weigh the numbers."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    packages = ("torch", "diffusers", "tomesd", "agentsd", "DeepCache", "tgate", "ca-tome")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "eval/speed.py", *argv]),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {name: _version(name) for name in packages},
        "memory_source": MEMORY_SOURCES[device.type],
    }


def run_record(settings: SpeedSettings, argv: Sequence[str] | None) -> dict[str, Any]:
    """speed.json's ``meta``: the flags as parsed, the plan, and the machine."""
    meta = {
        "args": {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in settings.flags.items()},
        **machine_info(settings.device, sys.argv[1:] if argv is None else argv),
    }
    meta["args"].update(runs=[asdict(run) for run in settings.runs], method_list=[m.name for m in settings.methods])
    meta["args"]["options"] = asdict(settings.options)
    return meta


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "results": [asdict(row) for row in rows]}, indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    columns = [name for name in Row.__dataclass_fields__ if name != "seconds"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def plot_speedup(path: Path, rows: Sequence[Row], title: str) -> None:
    """Speed-up over the baseline against resolution, one line per method, one panel per source, compile and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(_group(row) for row in rows))
    columns = min(3, len(groups))
    rows_of_panels = -(-len(groups) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5.5 * columns, 4 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, group in zip(axes.flat, groups):
        members = [row for row in rows if _group(row) == group]
        baseline = members[0].baseline
        for method in dict.fromkeys(row.method for row in members if row.method != baseline):
            points = sorted((row.resolution, row.speedup) for row in members if row.method == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=f"{baseline} (baseline)")
        ax.set_xticks(sorted({row.resolution for row in members}))
        ax.set(xlabel="resolution (px)", ylabel=f"speed-up over {baseline}", title=_group_title(group))
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_outputs(out: Path, meta: dict[str, Any], rows: Sequence[Row], title: str) -> None:
    """All three files, after each workload (created then: a run that fails to start leaves no folder)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "speed.json", meta, rows)
    write_csv(out / "speed.csv", rows)
    plot_speedup(out / "speedup.png", rows, title)
