import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -24}  # accumulation is float32 for both


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def assert_within_rounding(actual, expected, magnitude, operations, dtype=torch.float32):
    """|actual - expected| <= operations * u * magnitude, elementwise.

    expected: the float64 reference; magnitude: the same reference computed on |inputs| (the sum of absolute
    terms that float rounding errors scale with); operations: a bound on the rounding steps each term passes
    through (the float32 error analysis of a dot product of length n gives n).
    """
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    bound = operations * UNIT_ROUNDOFF[dtype] * magnitude.double().cpu() + 1e-300
    excess = (actual - expected).abs() - bound
    worst = excess.argmax() if excess.numel() else None
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"error {float((actual - expected).abs().flatten()[worst]):.3e} exceeds float32 bound "
        f"{float(bound.flatten()[worst]):.3e} at flat index {int(worst)}")


def pytest_addoption(parser):
    parser.addoption("--zoo", default="default", choices=("default", "full"),
                     help="tests/test_zoo.py: 'default' checks a representative set of Hugging Face families; 'full' "
                          "every family of every auto mapping, and writes benchmarks/results/zoo.md")
