"""Builds embedfast._C: a CUDAExtension when torch has CUDA and nvcc is found, else a CPU-only CppExtension.

Works without a GPU: it finds the CUDA toolkit root, the CUDA headers pip installed beside torch and a
default arch list (sm_80, sm_90) on its own, and honours CUDA_HOME, TORCH_CUDA_ARCH_LIST and MAX_JOBS.
EMBEDFAST_NO_EXTENSION=1 skips the extension; EMBEDFAST_NO_CUDA=1 builds the CPU kernels only.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent  # absolute: ninja compiles from the build folder
DEFAULT_ARCH_LIST = "8.0;9.0"


def find_cuda_home() -> str | None:
    """The toolkit root: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda*, or the parent of a real nvcc on PATH."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    candidates = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a forwarding script: only a bin/ next to include/ is a toolkit root
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for root in candidates:
        if Path(root, "bin", "nvcc").exists() and Path(root, "include", "cuda_runtime.h").exists():
            return root
    return None


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the nvidia-* wheels torch depends on (cusparse.h etc.), missing from partial toolkits."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted({str(Path(h).parent) for h in glob.glob(os.path.join(base, "*", "include", "cusparse.h"))})
        found += sorted({str(Path(h).parent) for h in glob.glob(os.path.join(base, "*", "include", "cublas_v2.h"))})
    return list(dict.fromkeys(found))


def import_installed_torch():
    """The torch the extension will be imported into. Under pip's build isolation there is none (the
    build would otherwise have to fetch a torch of its own, whose ABI need not match the user's)."""
    try:
        import torch
    except ImportError:
        sys.exit("embedfast: building embedfast._C needs the torch it will run with, and none is importable here. "
                 "Install torch first, then build without pip's build isolation: "
                 "pip install --no-build-isolation <path to embedfast> "
                 "(or set EMBEDFAST_NO_EXTENSION=1 for the pure-PyTorch reference backend only).")
    return torch


def loaded_libstdcxx() -> list[str]:
    """The shared libstdc++ this process loaded with torch, named to the linker ahead of the compiler's own: the
    extension then shares torch's even where the compiler links libstdc++ statically (the GPU machines' g++ does, and
    a second copy inside the extension crashes its first stream read or error message)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return []
    return sorted({line.split()[-1] for line in maps.splitlines() if "/libstdc++.so" in line})[:1]


def extension_modules():
    if os.environ.get("EMBEDFAST_NO_EXTENSION") == "1":
        return [], {}
    torch = import_installed_torch()
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
    from torch.utils import cpp_extension

    use_cuda = bool(torch.version.cuda) and cuda_home is not None and os.environ.get("EMBEDFAST_NO_CUDA") != "1"
    sources = ["csrc/module.cpp", "csrc/eager.cpp", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))]
    # ATen's parallel_for is OpenMP inside the headers: without -fopenmp it runs on one thread
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    link_flags = ["-fopenmp", *loaded_libstdcxx()]
    include_dirs = [str(ROOT / "csrc" / "include")]
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        include_dirs += pip_cuda_include_dirs()
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        extension = cpp_extension.CUDAExtension(
            "embedfast._C", sources, include_dirs=include_dirs, extra_link_args=link_flags,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]})
    else:
        extension = cpp_extension.CppExtension("embedfast._C", sources, include_dirs=include_dirs,
                                               extra_link_args=link_flags, extra_compile_args={"cxx": cxx_flags})
    print(f"embedfast: building {'CUDA + CPU' if use_cuda else 'CPU'} kernels"
          + (f" (CUDA_HOME={cuda_home}, arch list {os.environ.get('TORCH_CUDA_ARCH_LIST')})" if use_cuda else ""),
          file=sys.stderr)
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
