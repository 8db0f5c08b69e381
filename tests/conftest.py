import os

import pytest

# Tests run on CPU, with few threads: the CI machine has 2 cores shared by gloo ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite tests the CPU path, also on a machine with CUDA and Transformer Engine (set before
# megatron_longsky is imported; spawned ranks inherit it). tests/gpu/ runs the GPU path in
# processes of its own, without this setting.
os.environ["LONGSKY_DEVICE"] = "cpu"


@pytest.fixture(autouse=True)
def _single_thread_torch():
    import torch

    torch.set_num_threads(1)
    yield
