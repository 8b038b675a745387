"""Compile the Triton kernels for NVIDIA GPUs without one; print what a GPU would run, as JSON.

Run as a script with TRITON_INTERPRET unset (the interpreter replaces the kernels). It prints
  "kernels": for each kernel variant and arch, the PTX global loads/stores and the ptxas resource usage;
  "graphs":  for each operator traced by AOTAutograd (as torch.compile does) on fake CUDA tensors, the
             Triton kernels in the graph and the tensors each launch makes the compiler copy.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from functorch.compile import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET: the interpreter replaces the kernels"
from embedfast import triton_kernels as tk  # noqa: E402
from embedfast import triton_norm as tn  # noqa: E402
from embedfast.spec import (BackwardInputs, ForwardInputs, NormInputs, NormMode, PositionMode,  # noqa: E402
                            TokenGrad)

ARCHS = {"sm_80": 80, "sm_90": 90}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def variants():
    """(label, kernel, argument types, constexprs, num_warps) for the launches that matter: BERT-like, dim 768."""
    for dtype in ("fp32", "bf16"):
        block_t, block_d, num_warps = tk.launch_config(768)
        for position, mode in (("learned", PositionMode.LEARNED), ("sinusoid", PositionMode.INTERLEAVED)):
            yield (f"forward-{dtype}-{position}", tk._forward_kernel,
                   {"ids_ptr": "*i32", "weight_ptr": f"*{dtype}", "position_ids_ptr": "*i32", "position_weight_ptr": f"*{dtype}",
                    "turns_ptr": "*fp64", "phase_ptr": "*fp64", "token_types_ptr": "*i32", "segment_ptr": f"*{dtype}",
                    "cu_seqlens_ptr": "*i32", "out_ptr": f"*{dtype}", "num_tokens": "i32", "dim": "i32", "scale": "fp64",
                    "position_offset": "i32", "seq_len": "i32", "num_documents": "i32"},
                   {"POSITION": mode.value, "HAS_POSITION_IDS": False, "PACKED": False, "SEARCH_STEPS": 1,
                    "HAS_SEGMENTS": True, "HAS_TOKEN_TYPES": True, "FP64": False, "BLOCK_T": block_t, "BLOCK_D": block_d},
                   num_warps)
        yield (f"grad-rows-{dtype}", tk._grad_rows_kernel,
               {"grad_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "token_types_ptr": "*i32", "partials_ptr": "*fp32",
                "num_tokens": "i32", "dim": "i32", "scale": "fp64", "num_segments": "i32"},
               {"WRITE_VALUES": True, "SEGMENT_PARTIALS": True, "HAS_TOKEN_TYPES": True, "FP64": False, "BLOCK_T": block_t,
                "BLOCK_D": block_d}, num_warps)
        norm_t, norm_d, _ = tn.norm_launch_config(768)
        norm_types = {"ids_ptr": "*i32", "weight_ptr": f"*{dtype}", "position_weight_ptr": f"*{dtype}",
                      "token_types_ptr": "*i32", "segment_ptr": f"*{dtype}", "dim": "i32", "scale": "fp64",
                      "position_offset": "i32", "seq_len": "i32", "norm_weight_ptr": f"*{dtype}",
                      "norm_bias_ptr": f"*{dtype}", "seed_ptr": "*i64", "stats_ptr": "*fp32", "out_ptr": f"*{dtype}",
                      "grad_ptr": f"*{dtype}", "partials_ptr": "*fp32", "values_ptr": f"*{dtype}",
                      "segment_partials_ptr": "*fp32", "position_grad_ptr": f"*{dtype}", "num_tokens": "i32",
                      "num_segments": "i32", "steps": "i32", "period": "i32", "eps": "fp64", "threshold": "i32",
                      "keep_scale": "fp64"}
        for direction in ("forward", "backward"):  # BERT's: learned positions, segments, LayerNorm, dropout
            yield (f"norm-{direction}-{dtype}", tn._norm_kernel, norm_types,
                   {"POSITION": PositionMode.LEARNED.value, "HAS_POSITION_IDS": False, "PACKED": False, "SEARCH_STEPS": 1,
                    "HAS_SEGMENTS": True, "HAS_TOKEN_TYPES": True, "FP64": False, "NORM": NormMode.LAYERNORM.value,
                    "HAS_WEIGHT": True, "HAS_BIAS": True, "DROPOUT": True, "BACKWARD": direction == "backward",
                    "WEIGHT_GRAD": direction == "backward", "BIAS_GRAD": direction == "backward",
                    # the backward's one pass: values, segment and position sums, no grad_sum
                    "WRITE_OUT": direction == "forward", "WRITE_VALUES": direction == "backward",
                    "SEGMENT_GRAD": direction == "backward", "POSITION_TILES": direction == "backward",
                    "BLOCK_T": norm_t, "BLOCK_D": norm_d}, tn.norm_launch_config(768, direction == "backward")[2])
        yield (f"sorted-sum-{dtype}", tk._sorted_sum_kernel,
               {"grad_ptr": f"*{dtype}", "order_ptr": "*i64", "keys_ptr": "*i64", "run_end_ptr": "*i64", "out_ptr": f"*{dtype}",
                "dim": "i32", "scale": "fp64"},
               {"FP64": False, "BLOCK_D": block_d}, block_d // 128)


def compile_variant(kernel, types, constexprs, num_warps, arch):
    names = list(kernel.arg_names)
    signature = {name: types.get(name, "constexpr") for name in names}
    # what the launcher specializes for dim 768 and fresh allocations: 16-byte aligned pointers, dim % 16 == 0
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name, ty in types.items() if ty.startswith("*") or name == "dim"}
    return triton.compile(ASTSource(kernel, signature, constexprs, aligned), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", file.name], check=True, capture_output=True,
                                text=True).stdout
    registers, stack, shared, local = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report).groups()
    return {"registers": int(registers), "stack": int(stack), "local": int(local)}


class TargetOnlyDriver:
    """Stands in for the CUDA driver where torch asks Triton only which GPU to compile for."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def compiled_kernels():
    result = {}
    for label, kernel, types, constexprs, num_warps in variants():
        for arch, capability in ARCHS.items():
            compiled = compile_variant(kernel, types, constexprs, num_warps, capability)
            ptx = compiled.asm["ptx"]
            result[f"{label}/{arch}"] = {
                "loads": sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
                "stores": sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
                **resource_usage(compiled.asm["cubin"]),
            }
    return result


def traced_launches(op, *args):
    """[(kernel name, tensors the launch makes the compiler copy)] in the AOTAutograd graph of ``op``."""
    graphs = []

    def keep_graph(graph_module, _inputs):
        graphs.append(graph_module)
        return graph_module

    def call(*tensors):
        supplied = iter(tensors)
        return op(*[next(supplied) if isinstance(a, torch.Tensor) else a for a in args])

    aot_function(call, fw_compiler=keep_graph)(*[a for a in args if isinstance(a, torch.Tensor)])
    table = torch._higher_order_ops.triton_kernel_wrap.kernel_side_table
    return [(table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__, node.kwargs["tensors_to_clone"])
            for node in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(node.target)]


def traced_graphs():
    triton.runtime.driver.set_active(TargetOnlyDriver())
    with FakeTensorMode():
        ids = torch.empty(64, dtype=torch.int64, device="cuda")
        weight = torch.empty(100, 768, device="cuda")
        segments = torch.empty(2, 768, device="cuda")
        positions = torch.empty(16, 768, device="cuda")
        grad = torch.empty(64, 768, device="cuda")
        bert = ForwardInputs(ids, weight, position_weight=positions, token_type_ids=ids, segment_weight=segments,
                             position_mode=PositionMode.LEARNED, seq_len=8)
        layernorm = NormInputs(torch.empty(768, device="cuda"), torch.empty(768, device="cuda"),
                               int(NormMode.LAYERNORM), 1e-12, 0.1, torch.empty(1, dtype=torch.int64, device="cuda"))
        stats = torch.empty(64, 2, device="cuda")
        return {
            "norm-forward": traced_launches(torch.ops.embedfast.norm_forward_triton, *bert, *layernorm),
            "norm-backward": traced_launches(torch.ops.embedfast.norm_backward_triton, grad, stats, *bert, *layernorm,
                                             True, int(TokenGrad.SPARSE), -1, True, True),
            "forward-sinusoid": traced_launches(torch.ops.embedfast.forward_triton, *ForwardInputs(
                ids, weight, token_type_ids=ids, segment_weight=segments, scale=2.0, position_mode=PositionMode.INTERLEAVED,
                seq_len=8)),
            "forward-learned": traced_launches(torch.ops.embedfast.forward_triton, *ForwardInputs(
                ids, weight, position_weight=positions, token_type_ids=ids, segment_weight=segments, scale=2.0,
                position_mode=PositionMode.LEARNED, max_positions=16, seq_len=8)),
            "backward-sparse": traced_launches(torch.ops.embedfast.backward_triton, *BackwardInputs(
                grad, ids, 100, token_type_ids=ids, token_grad=TokenGrad.SPARSE, padding_idx=0, scale=2.0, num_positions=16,
                num_segments=2, seq_len=8)),
            "backward-dense": traced_launches(torch.ops.embedfast.backward_triton, *BackwardInputs(
                grad, ids, 100, token_type_ids=ids, token_grad=TokenGrad.DENSE, padding_idx=0, scale=2.0, num_segments=2,
                seq_len=8)),
        }


def main():
    json.dump({"kernels": compiled_kernels(), "graphs": traced_graphs()}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
