"""Cost of planning one block's merge, this checkout against an earlier revision, on the CPU.

    python benchmarks/plan_merge.py --before 13290ca

Per block and UNet call, planning is: draw the grid layout (destinations, sources) and plan the
merge from the block input. Both revisions do the same work with the same seeded draws (their plans
are checked equal first); the two are timed interleaved, so a drift of the machine hits both alike.
Batch 2 (a guidance pair), C = 320 (SD 1.5's top level), the recipe's two phases at ratio 0.4.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from agentsd.layout import GridLayout, draw_keys
from agentsd.merge import plan_merge

PHASES = {"agent phase (sx=sy=4, agent_ratio 0.95)": (4, 0.95), "ToMe phase (sx=sy=2)": (2, 0.5)}
SIDES = (64, 96, 128)  # 4,096 / 9,216 / 16,384 tokens: 512 / 768 / 1024 px


def load_revision(revision: str):
    """``agentsd/merge.py`` as it was at ``revision``, imported as a standalone module."""
    source = subprocess.run(
        ["git", "show", f"{revision}:agentsd/merge.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "merge_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("merge_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare with (since 6072b85; e.g. 13290ca)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before = load_revision(args.before)

    key = draw_keys(0, torch.tensor(981.0), 1)[0]

    def old(x, side, sx, r, agent_r):
        return before.plan_merge(x, before.GridLayout.draw(side, side, sx, sx, key), r, agent_r)

    def new(x, side, sx, r, agent_r):
        return plan_merge(x, GridLayout.draw(side, side, sx, sx, key), r, agent_r)

    print("| phase | tokens | before (ms) | after (ms) | speed-up |\n|---|---|---|---|---|")
    for phase, (sx, agent_ratio) in PHASES.items():
        for side in SIDES:
            n = side * side
            x = torch.randn(2, n, 320, generator=torch.Generator().manual_seed(1))
            call = (x, side, sx, int(n * 0.4), int(n * agent_ratio))
            a, b = old(*call), new(*call)
            assert torch.equal(a.unmerge_rows, b.unmerge_rows) and torch.equal(a.merge(x), b.merge(x))
            times = {old: [], new: []}
            for _ in range(2):  # warm-up
                old(*call), new(*call)
            for i in range(args.repeats):
                for fn in (old, new) if i % 2 else (new, old):
                    start = time.perf_counter()
                    fn(*call)
                    times[fn].append(time.perf_counter() - start)
            t_old, t_new = (statistics.median(times[fn]) * 1e3 for fn in (old, new))
            print(f"| {phase} | {n:,} | {t_old:.1f} | {t_new:.1f} | {t_old / t_new:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
