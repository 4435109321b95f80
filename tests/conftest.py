import os
import random

import numpy as np
import pytest
import torch

# The test suite's own Ray clusters (tests that call ray.init in this process) listen on loopback with token
# auth, like the sweep's private one (tuning.sweep.LOCAL_RAY_ENV); Ray reads both when it is imported, so they are
# set here, before any test module imports it.
for _key, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of tiny models: threading only costs time on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
