"""CMakeLists.txt builds the same library from the same sources (slow: a full C++/CUDA build)."""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cmake_builds_the_extension(tmp_path):
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    try:
        import nvidia  # the CUDA wheels torch installs: headers and nvrtc a partial toolkit lacks
    except ImportError:
        site = None
    else:
        site = Path(nvidia.__path__[0])
    cuda_include = next(iter(glob.glob(str(site / "*" / "include" / "cusparse.h"))), None) if site else None
    nvrtc = next(iter(glob.glob(str(site / "*" / "lib" / "libnvrtc.so*"))), None) if site else None
    with_cuda = bool(torch.version.cuda) and Path("/usr/local/cuda/bin/nvcc").exists() and cuda_include and nvrtc
    args = [cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DEMBEDFAST_OUTPUT_DIR={tmp_path / 'out'}"]
    if with_cuda:
        args += ["-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc", "-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda",
                 f"-DEMBEDFAST_EXTRA_CUDA_INCLUDE={Path(cuda_include).parent}", f"-DCUDA_nvrtc_LIBRARY={nvrtc}"]
    else:
        args += ["-DEMBEDFAST_CUDA=OFF"]
    configure = subprocess.run(args, capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    build = subprocess.run([cmake, "--build", str(tmp_path / "build"), "-j2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    built = list((tmp_path / "out").glob("_C*.so"))
    assert len(built) == 1
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(built[0])], capture_output=True, text=True).stdout
    assert "PyInit__C" in symbols
    if with_cuda:
        assert "forward_kernel" in subprocess.run(["nm", "-C", str(built[0])], capture_output=True, text=True).stdout
