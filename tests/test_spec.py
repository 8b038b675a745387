"""embedfast/spec.py and its C++ mirror, csrc/include/embedfast/spec.h, say the same thing."""

import enum
import re
from pathlib import Path

import pytest
import torch

from embedfast import spec

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "include" / "embedfast" / "spec.h").read_text()


def _macro(name: str) -> str:
    """The body of ``#define name(X) ...`` (its continued lines)."""
    match = re.search(rf"#define {name}\([^)]*\)((?:.*\\\n)*.*)", HEADER)
    assert match, f"{name} is not defined in spec.h"
    return match.group(1)


@pytest.mark.parametrize("python_enum, macro", [(spec.PositionMode, "EMBEDFAST_POSITION_MODES"),
                                                (spec.TokenGrad, "EMBEDFAST_TOKEN_GRADS"),
                                                (spec.CpuIsa, "EMBEDFAST_CPU_ISAS"),
                                                (spec.NormMode, "EMBEDFAST_NORM_MODES")])
def test_enums_match(python_enum, macro):
    cpp = {name.upper(): int(value) for name, value in re.findall(r"X\(k(\w+), (\d+)\)", _macro(macro))}
    assert cpp == {member.name.replace("_", ""): member.value for member in python_enum}


_CPP_TYPES = {"Tensor": "at::Tensor", "Tensor?": "std::optional<at::Tensor>", "float": "double", "int": "int64_t",
              "bool": "bool"}


def _cpp_type(argument: spec.Argument) -> str:
    if isinstance(argument.default, enum.IntEnum):  # an int in the schema, its enum in C++
        return type(argument.default).__name__
    return _CPP_TYPES[argument.type]


def _arguments(macro: str) -> list[tuple[str, str]]:
    """The X(type, name) entries of an argument macro, with the argument macros it names expanded in place."""
    entries = []
    for nested, cpp_type, name in re.findall(r"(EMBEDFAST_\w+)\(X\)|X\(([^,]+), (\w+)\)", _macro(macro)):
        entries += _arguments(nested) if nested else [(cpp_type, name)]
    return entries


@pytest.mark.parametrize("kind, macro", [("forward", "EMBEDFAST_FORWARD_ARGUMENTS"),
                                         ("backward", "EMBEDFAST_BACKWARD_ARGUMENTS"),
                                         ("gradient", "EMBEDFAST_GRADIENT_ARGUMENTS"),
                                         ("norm_forward", "EMBEDFAST_NORM_FORWARD_ARGUMENTS"),
                                         ("norm_backward", "EMBEDFAST_NORM_BACKWARD_ARGUMENTS")])
def test_operator_arguments_match(kind, macro):
    cpp = _arguments(macro)
    arguments = spec._GRADIENT if kind == "gradient" else spec.OPERATORS[kind][0]
    assert cpp == [(_cpp_type(a), a.name) for a in arguments]


def test_dropout_seed_bound_matches():
    match = re.search(r"kDropoutSeedBound = int64_t\{1\} << (\d+);", HEADER)
    assert match and 2 ** int(match.group(1)) == spec.DROPOUT_SEED_BOUND


def test_table_dtypes_and_compute_dtype_match():
    dispatch = _macro("EMBEDFAST_DISPATCH_TABLE_TYPES")
    assert "AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16," in dispatch  # float32, float64 + these two
    assert set(spec.TABLE_DTYPES) == {torch.float32, torch.float64, torch.float16, torch.bfloat16}
    assert "std::conditional_t<std::is_same_v<scalar_t, double>, double, float>" in HEADER
    assert "storage == at::kDouble ? at::kDouble : at::kFloat" in HEADER
    assert {d: spec.compute_dtype(d) for d in spec.TABLE_DTYPES} == {
        d: torch.float64 if d == torch.float64 else torch.float32 for d in spec.TABLE_DTYPES}


def test_api_position_names_map_onto_the_modes():
    modes = {spec.position_mode(p, layout) for p in spec.POSITION_ENCODINGS for layout in spec.SINUSOID_LAYOUTS}
    assert modes == set(spec.PositionMode)

