"""Command line, device and model loading shared by the examples, with errors that say what to do.

Everything a new user commonly gets wrong (no GPU, float16 on a CPU, a mistyped model id, no
network) is checked here, before a multi-gigabyte download or load starts, and reported as an
:class:`ExampleError` whose message names the flag to change. :func:`run_cli` turns that error into
one line on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import diffusers
import torch
from comparison import METHODS, check_methods  # also puts eval/ on sys.path, for shared
from flag_types import int_at_least
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from shared import DTYPES, HelpFormatter, dtype_kwarg

#: Default --ratio: the ratio of the recipe as agentsd documents it, apply_patch(pipe, ratio=0.4).
DEFAULT_RATIO = 0.4

Loadable = TypeVar("Loadable")


class ExampleError(RuntimeError):
    """A problem with how an example was called; the message says how to fix it."""


def _image_side(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (e.g. 512), got {text}")
    return value


def _merge_ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), the fraction of tokens merged away; got {text}")
    return value


def _png_or_folder(text: str) -> Path:
    path = Path(text).expanduser()
    if path.suffix and path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"must be a .png file or a folder, got {text}")
    return path


def example_parser(doc: str, *, model: str, prompt: str | None) -> argparse.ArgumentParser:
    """A parser with the flags every example shares, its ``--help`` led by the script's docstring.

    ``prompt`` is the default ``--prompt`` (``None``: the script takes its prompts otherwise).
    ``--height`` and ``--width`` default to the resolution the model was trained at (:func:`image_size`).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=model, help=f"hub id or local diffusers folder (default: {model})")
    if prompt is not None:
        parser.add_argument("--prompt", default=prompt, help=f"what to generate (default: {prompt!r})")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by every method (default: 0)")
    parser.add_argument("--steps", type=int_at_least(1), default=50, help="denoising steps (default: 50)")
    parser.add_argument(
        "--ratio",
        type=_merge_ratio,
        default=DEFAULT_RATIO,
        help=f"fraction of tokens merged away in each patched block (default: {DEFAULT_RATIO})",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="what to compare; SD is the unpatched pipeline (default: all)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--height", type=_image_side, help="in pixels (default: the model's native size)")
    parser.add_argument("--width", type=_image_side, help="in pixels (default: the model's native size)")
    parser.add_argument(
        "--out", type=_png_or_folder, default=Path("outputs"), help="PNG file or folder (default: outputs/)"
    )
    return parser


def _strength(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], how far the image is noised; got {text}")
    return value


def add_strength_arg(parser: argparse.ArgumentParser, default: float) -> None:
    """Add ``--strength``, how far image-to-image noises its input (parse with :func:`parse_with_strength`)."""
    parser.add_argument(
        "--strength", type=_strength, default=default, help=f"how far the image is noised (default: {default})"
    )


def parse_with_strength(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, refusing a ``--steps`` and ``--strength`` that run no step: diffusers runs ``int(steps * strength)``."""
    args = parser.parse_args(argv)
    if int(args.steps * args.strength) < 1:
        parser.error(f"--steps {args.steps} at --strength {args.strength} runs no denoising step; raise either")
    return args


def _image_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError) as err:  # PIL reports some corrupt files as SyntaxError
        raise argparse.ArgumentTypeError(f"{text} is not an image PIL can read (use a PNG or JPEG)") from err
    return path


def add_image_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--image``: the input picture, or a drawn sample scene so the example runs with no files."""
    parser.add_argument("--image", type=_image_file, default=None, help=f"{what} (default: a drawn sample scene)")


def resolve_device(name: str | None) -> torch.device:
    """The device named by ``--device``, or the best one available; fails early if it is missing."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ExampleError(f"--device {name!r} is not a device; use cuda, cuda:N, mps or cpu") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExampleError(
            f"--device {name} was asked for but this PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
            "Run on the CPU with --device cpu (slow: use few --steps), or install a CUDA build of PyTorch."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ExampleError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ExampleError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cuda", "mps", "cpu"):
        raise ExampleError(f"--device {name}: the examples support cuda, mps and cpu")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The ``--dtype`` to load weights in; half precision on a GPU, and never float16 on the CPU."""
    if name is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise ExampleError(f"--dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise ExampleError(
            "--dtype float16 on the CPU is very slow or unsupported by many CPU kernels; "
            "use --dtype float32 (the CPU default), or run on a GPU with --device cuda"
        )
    return DTYPES[name]


@dataclass(frozen=True)
class Target:
    """Where the models run and in which precision."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str | None = None, dtype: str | None = None) -> Target:
        """Check a device and dtype name (``None``: the best default) before anything is loaded."""
        resolved = resolve_device(device)
        return cls(device=resolved, dtype=resolve_dtype(dtype, resolved))


def resolve_target(args: argparse.Namespace) -> Target:
    """Check ``--device``, ``--dtype`` and ``--methods`` together, before anything is loaded."""
    target = Target.resolve(args.device, args.dtype)
    try:
        check_methods(args.methods)
    except ModuleNotFoundError as err:
        raise ExampleError(f"{err}; `pip install tomesd`, or leave ToMeSD out of --methods") from err
    return target


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", os.sep)) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name


def _source(name: str, flag: str) -> str:
    """``name`` as ``from_pretrained`` wants it: an existing folder (``~`` expanded) or a hub id.

    A missing folder or a malformed hub id is reported here, without touching the network.
    """
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder)
    if _looks_like_path(name):
        raise ExampleError(f"{flag} {name}: no such folder. Pass an existing diffusers folder or a hub id.")
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ExampleError(f"{flag} {name!r} is neither an existing folder nor a valid hub id ({err})") from err
    return name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (``HF_ENDPOINT``) accepts a connection within ``timeout`` seconds.

    Without a network, huggingface_hub retries some lookups with a backoff (1 + 2 + 4 + 8 + 8 s:
    ``AutoPipelineForText2Image`` spent 30 s so before its error) while others fail at once. One
    connection attempt up front lets every example fail, or load from the cache, as fast. Behind a
    proxy a direct connection proves nothing, so the hub is then taken as reachable.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(hub_constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_advice(source: str, flag: str, err: OSError, *, unreachable: bool = False) -> str:
    """The project's own explanation first, then what to do, then the library's message as a detail.

    Offline, diffusers and huggingface_hub lead with "pass local_files_only=False", which is no help
    without a network; the first line here says what actually happened.
    """
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(source).is_dir():
        return "\n".join(
            [
                f"could not load {flag} {source!r}: {reason}",
                "  - a local model must be a diffusers folder, as written by save_pretrained()",
            ]
        )
    host = urlsplit(hub_constants.ENDPOINT).hostname
    if isinstance(err, GatedRepoError):
        lines = [f"could not load {flag} {source!r}: the model is gated"]
        lines.append("  - accept its licence on huggingface.co, then `hf auth login`")
    elif _hub_offline():
        lines = [
            f"could not load {flag} {source!r}: it is not (completely) in the local Hugging Face cache, "
            "and HF_HUB_OFFLINE is set, so nothing is downloaded"
        ]
    elif unreachable:
        lines = [
            f"could not load {flag} {source!r}: it is not (completely) in the local Hugging Face cache, "
            f"and {host} cannot be reached (no network?)"
        ]
    else:
        lines = [f"could not load {flag} {source!r}: {reason}"]
    if not isinstance(err, GatedRepoError):
        lines.append(f"  - check the id on https://huggingface.co/{source} (gated models also need `hf auth login`)")
    if _hub_offline():
        lines.append("  - HF_HUB_OFFLINE is set, so only models already in the local cache can be loaded")
    elif unreachable:
        lines.append(f"  - {host} cannot be reached, so only models already in the local cache can be loaded")
    lines.append(
        f"  - no network? on a machine with one run `hf download {source} --local-dir ./model`, "
        f"copy the folder over and pass {flag} ./model"
    )
    if lines[0] != f"could not load {flag} {source!r}: {reason}":
        lines.append(f"  - the loader said: {reason}")
    return "\n".join(lines)


def model_kind(pipeline_class: str) -> str:
    """The model family a pipeline class name stands for: ``"SDXL"``, ``"SD 1.x/2.x"``, ... or the name itself."""
    for prefix, kind in (
        ("StableDiffusionXL", "SDXL"),
        ("StableDiffusion3", "SD3"),
        ("StableDiffusion", "SD 1.x/2.x"),
        ("Flux", "Flux"),
        ("PixArt", "PixArt"),
    ):
        if pipeline_class.startswith(prefix):
            return kind
    return pipeline_class


#: The examples that take each kind of model, for the advice when a model of another kind is given.
_EXAMPLES_FOR = {
    "SDXL": "examples/sdxl.py or examples/compare_grid.py",
    "SD 1.x/2.x": "examples/img2img.py, examples/hires_fix.py, examples/controlnet.py or examples/compare_grid.py",
}


def _check_model_kind(cls: type, source: str, flag: str, hub_kwargs: dict[str, Any]) -> None:
    """Refuse a pipeline folder or hub id whose ``model_index.json`` names another kind of model than ``cls``.

    Loading, e.g., an SD 1.5 folder as ``StableDiffusionXLPipeline`` succeeds with the second text
    encoder missing, and the first call then fails with an ``AttributeError`` deep in diffusers.
    Auto pipelines (any kind) and single models (``ControlNetModel``, no ``model_index.json``) pass.
    """
    if not issubclass(cls, diffusers.DiffusionPipeline) or cls.__name__.startswith("AutoPipeline"):
        return
    index = Path(source) / "model_index.json"
    if not index.parent.is_dir():  # a hub id: only this small file, which from_pretrained fetches first anyway
        try:
            index = Path(hf_hub_download(source, "model_index.json", **hub_kwargs))
        except EntryNotFoundError as err:
            if isinstance(err, LocalEntryNotFoundError):  # offline and not cached: _load_advice explains
                raise
            return  # a repository without the file: from_pretrained says what is wrong
    elif not index.is_file():
        return  # from_pretrained says what is missing, and _load_advice what a diffusers folder is
    found = json.loads(index.read_text()).get("_class_name")
    wanted = model_kind(cls.__name__)
    if found and model_kind(found) != wanted:
        kind = model_kind(found)
        hint = f"; for {kind} models use {_EXAMPLES_FOR[kind]}" if kind in _EXAMPLES_FOR else ""
        raise ExampleError(
            f"{flag} {source!r} is not an {wanted} model: its model_index.json names {found} ({kind}), "
            f"and this loads {cls.__name__}{hint}"
        )


def load_pretrained(
    cls: type[Loadable], name: str | Path, target: Target, *, flag: str = "--model", **kwargs: Any
) -> Loadable:
    """``cls.from_pretrained(name)`` in ``target``'s dtype, moved to its device.

    ``flag`` is how the user gave ``name`` (``--model``, ``--controlnet``, an environment variable),
    so that a failure says which setting to change. A hub id is loaded from the local cache alone
    when the hub cannot be reached (:func:`hub_reachable`), so that no network fails in seconds.
    A pipeline of another kind than ``cls`` (an SD 1.5 folder for SDXL) is refused before loading.
    """
    source = _source(str(name), flag)
    unreachable = not Path(source).is_dir() and not _hub_offline() and not hub_reachable()
    if unreachable:
        kwargs["local_files_only"] = True
    hub_kwargs = {key: kwargs[key] for key in ("local_files_only", "revision", "token", "cache_dir") if key in kwargs}
    try:
        _check_model_kind(cls, source, flag, hub_kwargs)
        loaded = cls.from_pretrained(source, **{dtype_kwarg(): target.dtype}, **kwargs)
    except OSError as err:
        raise ExampleError(_load_advice(source, flag, err, unreachable=unreachable)) from err
    return loaded.to(target.device)


def native_size(pipe: Any) -> tuple[int, int]:
    """``(width, height)`` in pixels that the pipeline's UNet was trained at (512 for SD 1.5, 1024 for SDXL).

    Image-to-image and ControlNet take their output size from the input picture, so the input is
    resized to this unless ``--width``/``--height`` say otherwise; text-to-image pipelines use it too.
    """
    sample = pipe.unet.config.sample_size
    height, width = (sample, sample) if isinstance(sample, int) else sample
    return width * pipe.vae_scale_factor, height * pipe.vae_scale_factor


def image_size(args: argparse.Namespace, pipe: Any) -> tuple[int, int]:
    """``(width, height)``: ``--width`` and ``--height`` where given, else the model's native size."""
    width, height = native_size(pipe)
    return args.width or width, args.height or height


def output_path(out: Path, default_name: str) -> Path:
    """``--out`` itself if it names a PNG, else ``default_name`` inside that folder."""
    return out if out.suffix.lower() == ".png" else out / default_name


def run_cli(main: Callable[[Sequence[str] | None], object]) -> None:
    """Run an example's ``main`` from the command line: an :class:`ExampleError` becomes one line."""
    try:
        main(None)
    except ExampleError as err:
        sys.exit(f"error: {err}")
