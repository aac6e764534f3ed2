"""eval/speed.py's ``--arch svd``: the published SVD UNet builds, its forward's inputs are a guided video
pair, and a whole run times SDPA, AgentSD's two phases and the ceiling on the tiny SVD UNet.

Timings are never asserted: they are meaningless on tiny models and on a shared test machine.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

import agentsd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def eval_modules(monkeypatch):
    """eval/ on sys.path, as when its scripts run."""
    monkeypatch.syspath_prepend(str(ROOT / "eval"))


def test_the_published_svd_unet_builds_and_patches_its_top_level():
    """On the meta device: no weights, the architecture only (1,524.6 M parameters, as published)."""
    from unet_configs import ARCHS

    unet = ARCHS["svd"].build_unet("meta")
    assert type(unet).__name__ == "UNetSpatioTemporalConditionModel"
    assert sum(p.numel() for p in unet.parameters()) == 1_524_623_082
    sites = agentsd.select_blocks(unet)
    assert len(sites) == 5 and {site.downsample for site in sites} == {1}  # 2 down, 3 up, as SD 1.5's
    assert ARCHS["svd"].build_scheduler().config.timestep_type == "continuous"


def test_svd_forward_is_one_guided_video_of_batch_over_two_frames():
    import video
    import workloads
    from unet_configs import ARCHS

    unet = ARCHS["tiny-svd"].build_unet()
    seen = []

    def forward(sample, timestep, **cond):
        seen.append((sample.shape, float(timestep), {name: value.shape for name, value in cond.items()}))

    workloads.unet_workload(unet, 64, 8, batch=6, timestep=981).call(forward, False)
    ((shape, c_noise, cond),) = seen
    assert shape == (2, 3, 8, 8, 16)  # the pair of one video of 3 frames, 64x128 px (16:9)
    assert cond == {"encoder_hidden_states": (2, 1, 32), "added_time_ids": (2, 3)}
    assert c_noise == pytest.approx(agentsd.schedule.SD_LOG_SIGMAS[981] / 4)
    assert video.frame_size(576) == (576, 1024)


def test_svd_run_times_sdpa_the_two_phases_and_the_ceiling(tmp_path, capsys):
    speed = importlib.import_module("speed")
    threads = torch.get_num_threads()
    argv = ["--arch", "tiny-svd", "--resolutions", "64", "--batch", "4", "--repeats", "1", "--warmup", "0"]
    methods = ["sd", "agent-phase", "tome-phase", "ceiling"]
    try:
        speed.main([*argv, "--methods", *methods, "--threads", "1", "--no-memory", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert {row["method"] for row in results} == {"sd", "agent-phase-r0.4", "tome-phase-r0.4", "ceiling"}
    with pytest.raises(SystemExit):
        speed.main(["--arch", "svd", "--mode", "pipeline", "--out", str(tmp_path / "pipeline")])
    assert "argument --arch: svd (a video UNet, random weights) is timed in --mode unet only" in capsys.readouterr().err
