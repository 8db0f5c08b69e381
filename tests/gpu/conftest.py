"""tests/gpu/: the GPU path on a real CUDA device (marker ``gpu``; skipped without CUDA).

Run them with ``tests/gpu/run.sh`` (one GPU, a few minutes). Each scenario runs in a process
of its own (tests/gpu/scenarios.py) without the CPU suite's ``LONGSKY_DEVICE=cpu``.
"""

from pathlib import Path

import pytest
from gpu_runner import run_scenario

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/gpu/run.sh runs them)")


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = None if _cuda_present() else pytest.mark.skip(reason="no CUDA device (tests/gpu/ runs on a GPU)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cpu_checkpoint(tmp_path_factory):
    """A checkpoint written by the CPU path (local spec, LONGSKY_DEVICE=cpu), and its NLL there."""
    return run_scenario("cpu_checkpoint", tmp_path_factory.mktemp("cpu_ckpt"), cpu=True)
