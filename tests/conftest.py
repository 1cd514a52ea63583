import os

import pytest
import torch

# Without a GPU the Triton interpreter runs the real kernels on CPU tensors; it must be set before any
# @triton.jit kernel of the package is created, i.e. before fsa_compile is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fsa_compile  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (large GPU variant)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch):
    """Library allocations made with torch.empty* start as NaN (or -77 for integers): unwritten output fails."""

    def poison(tensor):
        if type(tensor) is not torch.Tensor:  # fake/functional tensors while torch.compile traces a launcher
            return tensor
        with torch.no_grad():  # callers may ask for requires_grad=True
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
            elif tensor.dtype in (torch.int32, torch.int64):
                tensor.fill_(-77)
        return tensor

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: poison(new_empty(self, *a, **kw)))
