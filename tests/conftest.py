import random

import numpy as np
import pytest
import torch

from tuning.sweep import set_environment

# The test suite's own Ray clusters (tests that call ray.init in this process, or drive tuning.studies without the
# sweep's main) get the sweep's environment: loopback and token auth like its private Ray (LOCAL_RAY_ENV, read when
# Ray is imported, so set here, before any test module imports it), and RAY_ENV.
set_environment()


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
