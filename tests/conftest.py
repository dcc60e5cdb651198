"""Test setup: without a GPU, the Triton kernels run in the interpreter (set before triton is imported)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """The test runs under this umask (restored afterwards): a new file's mode is ``0o666 & ~umask``."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)
