"""Shared test setup: the `gpu` marker's skip and a few fixtures every probe test uses.

Keep this small: fixtures that belong to one area live in that area's test file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` as well as `python -m pytest` can import probes/ and tests.fakes
    sys.path.insert(0, str(ROOT))

# Inside mutmut's mutants/ copy (docs/testing.md, "Mutation testing"), `gpuscope` must be the mutated copy under
# the module names mutmut gives its mutants; this does nothing anywhere else.
from tests.mutation_layout import install_if_mutmut_copy  # noqa: E402

install_if_mutmut_copy(ROOT)


def _cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        return False, f"torch.cuda.is_available() is False (torch {torch.__version__}): no CUDA GPU here"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    available, why = _cuda_available()
    if available:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def samples_path(tmp_path: Path) -> Path:
    """Where a test's samples.jsonl goes."""
    return tmp_path / "samples.jsonl"


@pytest.fixture
def h200_raw() -> dict:
    """What the NVML bindings and torch really returned on the H200 (tests/fixtures/gpu-facts)."""
    from tests.fakes.nvml import load_raw_h200

    return load_raw_h200()
