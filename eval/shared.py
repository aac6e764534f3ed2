"""What eval/speed.py, eval/fid.py and the examples share besides timing (:mod:`timing`): weight
dtypes by name, ``from_pretrained``'s keyword for them, and the ``--help`` formatter.

(Not ``common.py``: the examples have a module of that name, and tests import both folders.)
"""

from __future__ import annotations

import argparse

import torch

#: The weight dtypes a ``--dtype`` flag accepts, by name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_kwarg() -> str:
    """from_pretrained's name for the weights' dtype: ``dtype`` from diffusers 0.40 (``torch_dtype`` warns
    there), ``torch_dtype`` before (0.33-0.39 know no other)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default, once: not when the help already states it or there is none (``None``).

    Descriptions and epilogs are printed as written (their line breaks kept).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})"
