"""``python -m embedfast bench --norm / --dropout``: the rows run and are printed (tiny sizes: a smoke test)."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from embedfast.bench import FWD_BWD, Contenders, Problem

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_norm_dropout_rows_print():
    args = ["--norm", "layernorm", "--dropout", "0.1", "--quick", "--shapes", "2x8", "--dim", "32", "--vocab", "50",
            "--dtype", "fp32", "--grad", "dense", "--repeats", "1", "--backends", "reference"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # (conftest's, for the Triton tests: the bench runs as a user runs it)
    result = subprocess.run([sys.executable, "-m", "embedfast", "bench", *args], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "layernorm + dropout 0.1 after the sum, training mode" in out and "learned positions" in out
    for direction in ("forward", FWD_BWD):
        for contender in ("embedfast[reference]", "eager", "torch.compile", "floor", "copy"):
            row = [line for line in out.splitlines() if line.split()[:2] == [direction, contender]]
            assert len(row) == 1 and row[0].split()[2].replace(".", "").isdigit(), (direction, contender, out)


@pytest.mark.parametrize("norm, dropout", [("layernorm", 0.1), ("rmsnorm", 0.0), (None, 0.5)])
@pytest.mark.parametrize("sparse", [True, False])
def test_norm_contenders(norm, dropout, sparse):
    """The fused and eager contenders agree with the truth in eval mode, drop in training mode, and differentiate
    the norm's parameters (torch.compile is left out: its compilation is the CLI test's)."""
    problem = Problem("cpu", torch.float32, 2, 8, 32, 50, 2, "learned", sparse=sparse, norm=norm, dropout=dropout)
    contenders = Contenders(problem, ["reference"])
    fns = contenders.forward_fns()
    with torch.no_grad():
        expected = contenders.truth()
        with contenders.checking():
            for name in ("embedfast[reference]", "eager"):
                torch.testing.assert_close(fns[name]().double(), expected, atol=1e-5, rtol=1e-5)
        if dropout:
            assert (fns["embedfast[reference]"]() == 0).float().mean() > dropout / 2
    for name in ("embedfast[reference]", "eager", "floor", "copy"):
        grads = contenders.backward_fn(name, fns[name])()
        if name in ("embedfast[reference]", "eager"):
            assert len(grads) == 3 + {None: 0, "rmsnorm": 1, "layernorm": 2}[norm]
    element, tokens, rows = 4, 16, 16 + (16 if sparse else 50)
    norm_params = {None: 0, "rmsnorm": 32, "layernorm": 64}[norm] * element
    stats = 8 * tokens if norm else 0
    forward = (2 * tokens * 32 * element + 2 * 8 * tokens + (2 + 8) * 32 * element + stats + norm_params)
    assert problem.bytes_moved("forward") == forward
    backward = (rows * 32 * element + 2 * 8 * tokens + 2 * (2 + 8) * 32 * element + stats + 2 * norm_params
                + (tokens * 32 * element if norm else 0))
    assert problem.bytes_moved(FWD_BWD) == forward + backward


def test_compile_contender_is_compiled_for_every_problem():
    """Each problem gets its own compiled graph. Dynamo keys its cache on the code of ``Contenders.eager``, which
    every problem shares: past ``recompile_limit`` entries it would run that code uncompiled, silently, and the
    torch.compile column would time eager PyTorch."""
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(recompile_limit=2):
        for seq_len in range(1, 5):
            contenders = Contenders(Problem("cpu", torch.float32, 1, seq_len, 16, 50, 2, "sinusoidal"), [])
            graphs = counters["stats"]["unique_graphs"]
            with torch.no_grad():
                out = contenders.forward_fns()["torch.compile"]()
            assert counters["stats"]["unique_graphs"] == graphs + 1, seq_len
            torch.testing.assert_close(out.double(), contenders.truth())
