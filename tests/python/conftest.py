"""Shared fixtures for the spattn Python suite.

The installed package (with its compiled extension) is imported here, before any test module
puts the source tree's python/ directory on sys.path, so every test sees the same spattn.
"""

import importlib

import pytest
import torch

try:
    importlib.import_module("spattn")
except ImportError:  # tests that need the extension skip themselves; pure-Python ones still run
    pass

# One thread: the suite's problems are tiny, and on a loaded two-core machine OpenMP teams of
# two spend far longer waiting for each other than computing (test_threads_agree covers >1).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device and spattn's CUDA backend")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
