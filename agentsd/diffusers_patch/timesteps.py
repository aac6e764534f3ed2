"""A UNet call's noise level, read on the host without a device sync, in any scheduler's units.

The schedule's rule is in noise level (:mod:`agentsd.schedule`): ``t / num_train_timesteps`` for the
timestep ``t`` a pipeline passes its UNet. Almost every scheduler an SD or SDXL pipeline accepts
passes training timesteps (DDIM, PNDM, LMS, Euler, Heun, DPM-Solver, UniPC, DEIS, LCM, TCD, DDPM,
KDPM2; fractional ones under Karras sigmas); the flow-matching schedulers of SD3, Flux and PixArt
pass ``sigma * num_train_timesteps``, so their noise level is sigma (Flux's pipelines divide it by
1000 before the transformer: :attr:`NoiseRule.timestep_scale`). The EDM schedulers pass ``c_noise = log(sigma) / 4``
instead, and so does Euler as Stable Video Diffusion configures it (``timestep_type="continuous"``
with v-prediction): their sigma is mapped to the training timestep of Stable Diffusion's own noise
schedule with that sigma (:func:`edm_noise_level`), so the agent phase covers the same noise levels
whatever the scheduler. SVD's UNet is trained on ``c_noise``: a bare one is read so. For any other
scheduler the unit is unknown: a warning names it, once, and the model's own unit is used.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schedule import edm_noise_level

logger = logging.getLogger("agentsd")

#: Schedulers whose UNet timestep is ``0.25 * log(sigma)`` (EDM preconditioning).
EDM_SCHEDULERS = frozenset({"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"})

#: Schedulers whose UNet timestep is a training timestep in [0, num_train_timesteps).
TIMESTEP_SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "DDIMParallelScheduler",
        "DDPMScheduler",
        "DDPMParallelScheduler",
        "DEISMultistepScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSDEScheduler",
        "DPMSolverSinglestepScheduler",
        "EulerAncestralDiscreteScheduler",
        "EulerDiscreteScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
        "FlowMatchLCMScheduler",
        "HeunDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LCMScheduler",
        "LMSDiscreteScheduler",
        "PNDMScheduler",
        "SASolverScheduler",
        "TCDScheduler",
        "UniPCMultistepScheduler",
    }
)


#: UNets trained on EDM's ``c_noise`` (Stable Video Diffusion's): read so without a pipeline's scheduler.
C_NOISE_UNETS = frozenset({"UNetSpatioTemporalConditionModel"})


def passes_c_noise(scheduler: Any) -> bool:
    """Whether ``scheduler`` passes the UNet ``0.25 * log(sigma)``: an EDM scheduler, or Euler configured as
    SVD's (``timestep_type="continuous"`` and ``prediction_type="v_prediction"``, diffusers' condition)."""
    if type(scheduler).__name__ in EDM_SCHEDULERS:
        return True
    config = getattr(scheduler, "config", None)
    return (
        getattr(config, "timestep_type", None) == "continuous"
        and getattr(config, "prediction_type", None) == "v_prediction"
    )


def model_unit(unet: torch.nn.Module) -> str:
    """The timestep unit ``unet`` is trained on: ``"edm"`` for SVD's UNet, ``"timesteps"`` for the others."""
    return "edm" if type(unet).__name__ in C_NOISE_UNETS else "timesteps"


@dataclass
class NoiseRule:
    """How a UNet call's timestep becomes its noise level, for the scheduler of its pipeline.

    Attributes:
        num_train_timesteps: The horizon of ``t / num_train_timesteps``.
        owner: A weak reference to the pipeline patched, whose ``scheduler`` is read at every call (so a scheduler
            swapped in later is followed), or ``None`` for a bare model: read in ``model_unit``.
        timestep_scale: What the model's timestep is multiplied by to give the scheduler's (1000 for
            Flux, whose pipelines pass ``t / 1000``; else 1).
        warned: Scheduler classes already warned about.
        model_unit: The model's own unit (:func:`model_unit`), for a bare model and an unknown scheduler.
    """

    num_train_timesteps: int
    owner: Any = None
    timestep_scale: float = 1.0
    warned: set[str] = field(default_factory=set)
    model_unit: str = "timesteps"

    def __getstate__(self) -> dict[str, Any]:
        # The pipeline is not part of the UNet: a copied or unpickled UNet reads training timesteps.
        return self.__dict__ | {"owner": None}

    def unit(self) -> str:
        """``"timesteps"`` or ``"edm"``: what the pipeline's current scheduler passes the model (``model_unit``
        without a scheduler)."""
        owner = self.owner() if self.owner is not None else None
        scheduler = getattr(owner, "scheduler", None)
        if scheduler is None:
            return self.model_unit
        name = type(scheduler).__name__
        if passes_c_noise(scheduler):
            return "edm"
        if name in TIMESTEP_SCHEDULERS:
            return "timesteps"
        if name not in self.warned:
            self.warned.add(name)
            follows = (
                "log(sigma) / 4, as the UNet is trained"
                if self.model_unit == "edm"
                else f"t / num_train_timesteps ({self.num_train_timesteps}) as for DDIM-like schedulers"
            )
            warnings.warn(
                f"agentsd does not know the timestep unit of {name}; its phases follow {follows}", stacklevel=4
            )
        return self.model_unit

    def level(self, value: float) -> float:
        """The noise level of a timestep value read on the host."""
        if self.unit() == "edm":
            return float(edm_noise_level(torch.tensor(value)))
        return value * self.timestep_scale / self.num_train_timesteps

    def scheduler_level(self, value: float) -> float:
        """The noise level of one of the scheduler's own timesteps (``scheduler.timesteps``)."""
        return self.level(value / self.timestep_scale)

    def level_on_device(self, timestep: torch.Tensor) -> torch.Tensor:
        """The noise level of a 0-d float32 timestep tensor, computed on its device (traced calls)."""
        if self.unit() == "edm":
            return edm_noise_level(timestep)
        return timestep * self.timestep_scale / self.num_train_timesteps


#: Storages of more elements than this are not copied to the host whole (a timestep read from a large
#: buffer costs one read per call instead).
MAX_HOST_COPY = 1 << 16


@dataclass(eq=False)
class HostTimesteps:
    """Gives a call's timestep value on the host without making the host wait for the device each call.

    A pipeline passes views of its scheduler's ``timesteps`` tensor, which lives on the model's
    device: reading the element of each call would sync once per UNet call. Instead the whole
    storage behind the view is copied to the host once and each later view of it is read there, at
    its offset: one read per schedule, none per call. The copy is keyed by the storage itself, held
    so that its memory cannot be handed to another tensor, and by the version counter that every
    in-place write bumps, so a rewritten or new schedule is read afresh. Tensors without a version
    counter (made under ``torch.inference_mode``), tensor subclasses and views of large buffers are
    read directly: one read per call, as a plain ``float(timestep)``.

    Attributes:
        storage: The storage copied to the host, or ``None``.
        dtype: The element type its copy was read as.
        version: Its version counter when copied.
        values: Its elements, on the host.
    """

    storage: torch.UntypedStorage | None = None
    dtype: torch.dtype | None = None
    version: int = -1
    values: list[float] = field(default_factory=list)

    def first_value(self, timestep: torch.Tensor | float) -> float:
        """The value of ``timestep``'s first element (a Python number is returned as is)."""
        if not torch.is_tensor(timestep):
            return float(timestep)
        if type(timestep) is not torch.Tensor or timestep.is_inference():  # subclasses: storage may not be theirs
            return float(timestep.flatten()[0])
        storage = timestep.untyped_storage()
        if storage.nbytes() // timestep.element_size() > MAX_HOST_COPY:
            return float(timestep.flatten()[0])
        if not self._holds(storage, timestep):
            self.copy(storage, timestep)
        # A view's first element sits at its storage offset, whatever its shape and strides.
        return float(self.values[timestep.storage_offset()])

    def _holds(self, storage: torch.UntypedStorage, timestep: torch.Tensor) -> bool:
        return (
            self.storage is not None
            and storage.data_ptr() == self.storage.data_ptr()
            and storage.device == self.storage.device
            and storage.nbytes() == self.storage.nbytes()
            and timestep.dtype == self.dtype
            and timestep._version == self.version
        )

    def copy(self, storage: torch.UntypedStorage, timestep: torch.Tensor) -> None:
        """Copy ``storage``, the one behind ``timestep``, to the host: the one read of a schedule."""
        whole = timestep.new_empty(0).set_(storage)  # the whole storage, as timestep's dtype
        self.storage, self.dtype, self.version = storage, timestep.dtype, timestep._version
        self.values = whole.tolist()
