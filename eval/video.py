"""The inputs of one forward of Stable Video Diffusion's UNet, for eval/speed.py's ``unet`` mode.

SVD's UNet (``UNetSpatioTemporalConditionModel``) takes ``[videos, frames, 8, h, w]`` latents (the
noisy latents and the conditioning image's, stacked on the channels), one CLIP image embedding per
video, three added time ids (fps - 1, motion bucket, noise augmentation) and EDM's ``c_noise =
log(sigma) / 4`` as its timestep. Its spatial blocks see every frame as a batch entry, so the
flags keep their meaning per entry:

* ``--batch B``: the guided pair of one video of ``B / 2`` frames (``[2, B / 2, ...]``): the spatial
  blocks see ``B`` entries, as for ``B / 2`` images.
* ``--resolutions PX``: the frame height; the width is SVD's 16:9 landscape, rounded to 64 px
  (576 -> 576x1024, the native size).
* ``--timestep T``: the ``c_noise`` of the sigma that SD's schedule has at training timestep ``T``.
"""

from __future__ import annotations

from typing import Any

import torch

from agentsd.schedule import SD_LOG_SIGMAS

#: Width over height of SVD's frames (1024x576).
ASPECT = 16 / 9
#: Added time ids of SVD's pipeline defaults: fps 7 (passed as fps - 1), motion bucket 127, noise augmentation 0.02.
TIME_IDS = (6.0, 127.0, 0.02)


#: UNet classes that take these inputs (``--mode unet`` only: no pipeline is built around them).
VIDEO_UNETS = frozenset({"UNetSpatioTemporalConditionModel"})


def is_video_unet(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` is SVD's UNet, which takes these inputs instead of an image UNet's."""
    return type(unet).__name__ in VIDEO_UNETS


def frame_size(resolution: int) -> tuple[int, int]:
    """(height, width) in pixels of a frame of height ``resolution``, 16:9 and a multiple of 64."""
    return resolution, max(64, round(resolution * ASPECT / 64) * 64)


def unet_inputs(
    unet: torch.nn.Module, batch: int, resolution: int, vae_factor: int, timestep: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(sample, timestep, conditioning) of one guided forward: two videos (the pair) of ``batch / 2`` frames."""
    config, device, dtype = unet.config, unet.device, unet.dtype
    height, width = (side // vae_factor for side in frame_size(resolution))
    sample = torch.randn((2, batch // 2, config.in_channels, height, width), generator=generator)
    image = torch.randn((2, 1, config.cross_attention_dim), generator=generator)
    c_noise = torch.tensor(SD_LOG_SIGMAS[timestep] / 4, device=device)
    cond = {
        "encoder_hidden_states": image.to(device, dtype),
        "added_time_ids": torch.tensor([TIME_IDS] * 2, dtype=dtype, device=device),
    }
    return sample.to(device, dtype), c_noise, cond
