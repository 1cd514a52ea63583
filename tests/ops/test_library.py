"""define_op: one registration for every op; each path runs the op's checks once per call."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fsa_compile.ops._library import define_op, triton_implementations

calls = []


def _check(x, n):
    calls.append("check")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def _torch_impl(x, n):
    calls.append("torch")
    return x + n


def _triton_impl(x, n):
    calls.append("triton")
    return x + n


_op = define_op("_test_define_op_paths", "(Tensor x, SymInt n) -> Tensor", check=_check, torch_impl=_torch_impl,
                triton_impl=_triton_impl, fake=lambda x, n: torch.empty_like(x))


def test_each_path_checks_once():
    x = torch.zeros(3)
    calls.clear()
    assert torch.equal(_op(x, 2), x + 2)
    assert calls == ["check", "torch"]  # CPU kernel
    calls.clear()
    with FakeTensorMode() as mode:
        _op(mode.from_tensor(x), 2)
    assert calls == ["check"]  # fake
    calls.clear()
    with _op.set_kernel_enabled("cpu", False):  # the device path: Triton, or PyTorch for float64
        _op(x, 2)
        _op(x.double(), 2)
    assert calls == ["check", "triton", "check", "torch"]
    assert "_test_define_op_paths" in triton_implementations()


def test_a_failed_check_runs_no_implementation():
    calls.clear()
    try:
        _op(torch.zeros(3), -1)
    except ValueError as error:
        assert "n must be >= 0, got -1" in str(error)
    else:
        raise AssertionError("no ValueError")
    assert calls == ["check"]
