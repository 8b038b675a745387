"""What a GPU would run from the Triton backend, found without a GPU: the kernels compiled for sm_80
and sm_90 (PTX and ptxas' resource report), and the graph torch.compile traces from the operators."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("triton_gpu_build.py")
ROOT = SCRIPT.parent.parent


@pytest.fixture(scope="module")
def report() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


def test_every_kernel_compiles_for_sm80_and_sm90_without_stack_or_spills(report):
    kernels = report["kernels"]
    for kernel in ("forward-fp32-learned", "forward-bf16-sinusoid", "grad-rows-fp32", "sorted-sum-bf16", "norm-forward-bf16",
                   "norm-backward-fp32"):
        for arch in ("sm_80", "sm_90"):
            assert f"{kernel}/{arch}" in kernels
    for name, usage in kernels.items():
        assert usage["local"] == 0, f"{name}: {usage['local']} bytes of spills"
        assert usage["stack"] == 0, f"{name}: a {usage['stack']}-byte stack frame"
        assert usage["registers"] <= 128, f"{name}: {usage['registers']} registers"


def test_row_kernels_use_128_bit_loads_and_stores(report):
    for name, usage in report["kernels"].items():
        if name.startswith(("forward", "grad-rows", "norm")):
            assert "ld.global.v4.b32" in usage["loads"], f"{name}: {usage['loads']}"
            assert "st.global.v4.b32" in usage["stores"], f"{name}: {usage['stores']}"


def test_compile_sees_each_kernel_and_copies_no_input(report):
    graphs = report["graphs"]
    expected = {
        "norm-forward": [["_norm_kernel", ["stats_ptr", "out_ptr"]]],
        # BERT's backward in one kernel: sparse values, position and segment sums, the norm's sums; no grad_sum
        "norm-backward": [["_norm_kernel", ["partials_ptr", "values_ptr", "segment_partials_ptr", "position_grad_ptr"]]],
        "forward-sinusoid": [["_forward_kernel", ["out_ptr"]]],
        "forward-learned": [["_forward_kernel", ["out_ptr"]]],
        "backward-sparse": [["_grad_rows_kernel", ["values_ptr", "partials_ptr"]], ["_sorted_sum_kernel", ["out_ptr"]]],
        "backward-dense": [["_grad_rows_kernel", ["partials_ptr"]], ["_sorted_sum_kernel", ["out_ptr"]]],
    }
    assert graphs == expected
