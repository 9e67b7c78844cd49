"""Shared pytest setup. This directory is on sys.path (pytest's prepend mode puts a conftest's
directory there), so tests/gpu can import the shared case modules of tests/."""
import os

import pytest
import torch

# Tests pick backends explicitly; an override from the caller's shell would silently change them.
os.environ.pop("COLLAB_OPS_BACKEND", None)

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter (set before any test
# module imports triton). With a GPU they are compiled for it, so the variable must stay unset.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip_gpu)
