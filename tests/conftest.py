import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before any @triton.jit module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import skip_unless_available  # noqa: E402

# The reference is the ground truth in float32: TF32 convolutions (cuDNN's default on Ampere and
# later) would round the inputs of the spatial gate's conv to 10 bits, so two float32 inputs
# that differ in the last bit could give outputs 1e-3 apart.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With FUSED_CBAM_FAILURE_LOG set, each failure's traceback is appended to that file as it
    happens (a run cut off by a time limit, as on a leased GPU, still leaves them)."""
    path = os.environ.get("FUSED_CBAM_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


@pytest.fixture(autouse=True)
def _fresh_random_state():
    """Each test starts from its own seed and leaves the global random state as it found it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


@pytest.fixture
def poison():
    """Fill every torch.empty (at::empty in the C++ kernels too) with NaN, int: its maximum, so
    that an unwritten output element shows."""
    old = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture
def available_backend(backend):
    """Skips a test whose ``backend`` parameter names a backend that cannot run here (for
    ``pytest.mark.usefixtures`` in modules whose every test runs on each backend)."""
    skip_unless_available(backend)
