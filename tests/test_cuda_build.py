"""What a GPU would run, read from the built library without a GPU: the compiler's resource report
(no spills, no stack frame) and the SASS (128-bit global loads and stores in the forward kernel)."""

import re
import subprocess
from pathlib import Path

import pytest
import torch

import embedfast

ARCHS = ("sm_80", "sm_90")


def _library() -> Path:
    if embedfast.backends.unavailable_reason("extension", torch.device("cpu")) is not None:
        pytest.skip("the extension is not built")
    from embedfast import _C

    if not torch._C._dispatch_has_kernel_for_dispatch_key("embedfast::forward_extension", "CUDA"):
        pytest.skip("the extension was built without CUDA kernels")
    return Path(_C.__file__)


def _cuobjdump() -> Path:
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"no cuobjdump at {tool}")
    return tool


def _dump(flag: str) -> str:
    return subprocess.run([str(_cuobjdump()), flag, str(_library())], check=True, capture_output=True, text=True).stdout


def _functions_by_arch(text: str, pattern: str) -> dict[str, dict[str, str]]:
    """{arch: {mangled function name: its section of the dump}}."""
    sections: dict[str, dict[str, str]] = {}
    for part in re.split(r"\n(?=\s*arch = )", text):
        arch = re.search(r"arch = (sm_\d+)", part)
        if not arch:
            continue
        for function in re.finditer(pattern, part, flags=re.S):
            sections.setdefault(arch.group(1), {})[function.group(1)] = function.group(0)
    return sections


def _is_float64_variant(name: str) -> bool:
    """``forward_kernel<double, ...>``: mangled as ``kernelId`` followed by the index type (``i`` or ``l``)."""
    return re.search(r"kernelId[il]", name) is not None


def test_every_kernel_is_built_for_sm80_and_sm90_without_stack_or_spills():
    report = _dump("--dump-resource-usage")
    usage = re.findall(r"Function (\S*embedfast\S*):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    assert usage, report[:2000]
    for name, registers, stack, _shared, local in usage:
        assert int(local) == 0, f"{name}: LOCAL {local} (register spills)"
        assert int(registers) <= 128, f"{name} uses {registers} registers"
        if not _is_float64_variant(name):  # float64 (gradcheck) calls libdevice's double sine: its huge-argument path has a stack
            assert int(stack) == 0, f"{name}: STACK {stack}"
    for arch in ARCHS:
        assert f"arch = {arch}" in report


def test_forward_kernel_uses_128_bit_loads_and_stores():
    sass = _dump("--dump-sass")
    functions = _functions_by_arch(sass, r"Function : (\S*forward_kernel\S*Li(?:4|8)ELb[01]EE\S*)\n(.*?)(?=\n\s*Function :|\Z)")
    for arch in ARCHS:
        vectorized = functions.get(arch, {})
        assert vectorized, f"no vectorized forward kernel for {arch}"
        for name, body in vectorized.items():
            assert "LDG.E.128" in body, f"{arch} {name}: no 128-bit global load"
            assert "STG.E.128" in body, f"{arch} {name}: no 128-bit global store"
