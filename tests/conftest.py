import os

# The Triton interpreter must be on before triton_kernels is imported: CPU tensors then run Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# compiled graphs of earlier runs (in /tmp) may name operators as they were then: compile afresh
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import embedfast  # noqa: E402

BACKENDS = ("reference", "extension", "triton")

# property-based tests: a quick profile for every run, a long one for nightly runs (HYPOTHESIS_PROFILE=nightly)
_PROFILE = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture], "derandomize": True}
settings.register_profile("ci", max_examples=25, **_PROFILE)
settings.register_profile("nightly", max_examples=1000, **{**_PROFILE, "derandomize": False})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on CUDA tensors; skipped where no GPU is visible")
    config.addinivalue_line("markers", "slow: large or long tests")
    config.addinivalue_line("markers", "toolchain: reads the built extension's binary; gpu/check runs them on the GPU "
                            "machine's build too")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    return request.param


def _available(backend: str, device: str) -> str:
    reason = embedfast.backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    return backend


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    """Each backend that can run on ``device``; the others are skipped with the reason."""
    return _available(request.param, device)


@pytest.fixture(params=BACKENDS)
def cpu_backend(request):
    """Each backend that can run on CPU tensors, for tests of what only the CPU has (threads, its allocator)."""
    return _available(request.param, "cpu")
