"""Test-wide settings: never reach the network, keep CPU threads predictable."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment, which the libraries read at import)

# Tiny models gain nothing from a second thread, and on a loaded machine spinning threads cost 10-30x.
torch.set_num_threads(1)

# Make `import tiny` work from every test module.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after the test (compile tests count graphs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
