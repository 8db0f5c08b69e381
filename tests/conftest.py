import os

import pytest

# Tests run on CPU, with few threads: the CI machine has 2 cores shared by gloo ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _single_thread_torch():
    import torch

    torch.set_num_threads(1)
    yield
