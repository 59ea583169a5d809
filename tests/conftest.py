"""Test set-up: 8 virtual CPU devices (for sharding tests) before JAX initialises.

XLA's LLVM backend runs at optimisation level 0 here: the suite compiles many small programs
and spends most of its time compiling, not running. Results are asserted as numbers with
tolerances, so they do not depend on the level; timings live in benchmarks, not tests.
"""

import os
import sys

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu is installed for the AOT compile tests; every other JAX process stays on the CPU backend
# (with libtpu present, JAX would try the TPU first: slow, noisy, and it takes libtpu's lock).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A failure that is not bad input raises with its traceback in tests (the command line shows one line).
os.environ.setdefault("FOURD_JAX_DEBUG", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
from reference import CONFIGS, save_hf_model  # noqa: E402


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """(name, torch model, HF directory, our model, params) for each reference config."""
    from fourd_jax import hf

    directory = tmp_path_factory.mktemp(f"hf_{request.param}")
    torch_model = save_hf_model(CONFIGS[request.param](), directory)
    model, params = hf.load(directory)
    return request.param, torch_model, directory, model, params
