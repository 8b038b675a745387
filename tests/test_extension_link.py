"""The extension shares torch's libstdc++: a second, static copy inside it (what some compilers link by default) has
locale and stream state of its own, and the extension's first stream read or error message crashes the process."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import embedfast

pytestmark = pytest.mark.toolchain


def _library() -> Path:
    if embedfast.backends.unavailable_reason("extension", torch.device("cpu")) is not None:
        pytest.skip("the extension is not built")
    from embedfast import _C

    return Path(_C.__file__)


def _tool_output(*command: str) -> str:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} (binutils) is not installed")
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def test_libstdcxx_is_a_shared_library_dependency():
    needed = [line for line in _tool_output("readelf", "-d", str(_library())).splitlines() if "(NEEDED)" in line]
    assert any("libstdc++.so" in line for line in needed), needed


def test_no_copy_of_libstdcxx_streams_or_locales_inside():
    defined = _tool_output("nm", "-D", "--defined-only", str(_library())).split()
    # std::basic_istream<char>, std::locale, std::ios_base: never templates the extension instantiates itself
    copies = [name for name in defined if name.startswith(("_ZNSi", "_ZNSt6locale", "_ZNSt8ios_base"))]
    assert not copies, copies[:10]
