"""Regionally compiled SD 1.5 UNet forwards, AgentSD against SD and the ceiling, timed interleaved.

    python benchmarks/compiled_interleaved.py --resolution 512 --repeats 4

``eval/speed.py --compile`` compiles and times one method after another, so a drift of the machine
between minutes lands on the ratios. Here each method has its own UNet (same random weights),
compiled once with ``compile_repeated_blocks(fullgraph=True)``, and the timed forwards go round the
methods in turn, so drift hits them alike. CPU, fp32, batch 2, t = 981 (the agent phase).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
import methods as registry  # noqa: E402
import speed  # noqa: E402
from unet_configs import ARCHS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["sd", "agent-phase", "tome-phase", "ceiling"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    arch = ARCHS["sd15"]
    calls = {}
    applied = ExitStack()  # every method stays applied to its own UNet for the whole run
    for name in args.methods:
        unet = arch.build_unet().eval()
        method = registry.METHODS[name]
        ratio = 0.4 if method.uses_ratio else None
        applied.enter_context(method.applied(unet, ratio=ratio, seed=0, options=registry.MethodOptions()))
        unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
        generator = torch.Generator().manual_seed(0)
        side = args.resolution // 8
        inputs = {"sample": torch.randn(2, 4, side, side, generator=generator), "timestep": torch.tensor(981)}
        inputs |= speed.unet_conditioning(unet, 2, args.resolution, generator)
        calls[name] = lambda unet=unet, inputs=inputs: unet(**inputs)
        with torch.no_grad():
            start = time.perf_counter()
            calls[name]()  # compile
            print(f"{name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    times = {name: [] for name in args.methods}
    with torch.no_grad():
        for i in range(args.repeats):
            for name in args.methods if i % 2 == 0 else reversed(args.methods):
                times[name].append(speed.timed(calls[name], torch.device("cpu")))
    base = statistics.median(times[args.methods[0]])
    print(f"| method | s/forward (min-max) | vs {args.methods[0]} |\n|---|---|---|")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"| {name} | {median:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
