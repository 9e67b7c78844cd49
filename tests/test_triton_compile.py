"""The Triton kernels compiled for the H100 (sm_90a) on a machine without a GPU: Triton lowers
them to PTX and its bundled ptxas assembles them, so a kernel that the interpreter runs but the
GPU compiler rejects (types, layouts, unsupported ops) fails here, in CI, and not first on the
GPU machine. ptxas also reports spills to local memory, which the kernels must not have.

The compilation runs in a child process: the test session sets TRITON_INTERPRET=1, under which
`triton.jit` makes interpreter functions that cannot be compiled.

    python tests/test_triton_compile.py MODULE KERNEL TYPES_JSON CONSTEXPRS_JSON NUM_WARPS OUT.ptx
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FUSION_SCALARS = dict(STRIDES="*i64", INV_T="*fp32", W="*fp32", w_row_stride="i64", STATS="*fp32", SEED="*i64",
                      seed_row_stride="i64", seed_spread="i64", TOKENS="*i64", OUT="*fp32", V="i32",
                      log_alpha="fp32", inv_temperature="fp32", log_min_p="fp32")
KD_SCALARS = dict(student_ptr="*bf16", student_row_stride="i64", teacher_ptr="*bf16", teacher_row_stride="i64",
                  labels_ptr="*i64", loss_ptr="*fp32", stats_ptr="*fp32", grad_ptr="*bf16", grad_row_stride="i64",
                  row_scale_ptr="*fp32", row_scale_stride="i64", vocab="i32", grad_width="i32",
                  inv_temperature="fp32", beta="fp32", soft_scale="fp32", hard_weight="fp32", softcap="fp32",
                  ignore_index="i64")


def compile_to_ptx(module: str, kernel_name: str, types: dict, constexprs: dict, num_warps: int, out: Path):
    """The child process's work: the kernel's PTX for sm_90a."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), kernel_name)
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps))
    out.write_text(compiled.asm["ptx"])


def assert_compiles_without_spills(module, kernel_name, types, constexprs, num_warps, tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton wheel brings no ptxas")
    ptx = tmp_path / "kernel.ptx"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, module, kernel_name, json.dumps(types), json.dumps(constexprs),
                           str(num_warps), str(ptx)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    done = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", done.stderr)]
    assert spills and max(spills) == 0, done.stderr


def model_pointers(dtypes):
    return {f"P{i}": f"*{dtypes[i % len(dtypes)]}" for i in range(8)}


# (kernel name, pointer dtypes, constexprs, num_warps): the configurations collab_ops.triton.fusion
# launches for the decoding presets, K from 1 to 8 and mixed dtypes.
FUSION_CASES = [
    ("model_stats_kernel", ["bf16"], dict(K=3, ONLY_REF=False, REF=0, BLOCK=2048), 8),
    ("model_stats_kernel", ["fp32", "fp16"], dict(K=2, ONLY_REF=True, REF=1, BLOCK=2048), 8),
    ("fuse_kernel", ["bf16"], dict(K=3, NORMALIZE=True, PLAUSIBILITY=False, REF=0, LOGPROBS=True, INF_UNDEFINED=False,
                                   BLOCK=2048), 8),
    ("fuse_kernel", ["fp32", "bf16", "fp16"], dict(K=8, NORMALIZE=False, PLAUSIBILITY=True, REF=7, LOGPROBS=False,
                                                   INF_UNDEFINED=False, BLOCK=2048), 8),
    ("fuse_kernel", ["bf16"], dict(K=1, NORMALIZE=True, PLAUSIBILITY=True, REF=0, LOGPROBS=False,
                                   INF_UNDEFINED=False, BLOCK=256), 1),
    ("sample_kernel", ["bf16"], dict(K=3, NORMALIZE=False, PLAUSIBILITY=False, REF=0, GREEDY=False, MIN_P=False,
                                     INF_UNDEFINED=True, BLOCK=2048), 8),
    ("sample_kernel", ["bf16", "fp32"], dict(K=2, NORMALIZE=False, PLAUSIBILITY=True, REF=0, GREEDY=False, MIN_P=True,
                                             INF_UNDEFINED=True, BLOCK=2048), 8),
    ("sample_kernel", ["fp16"], dict(K=5, NORMALIZE=False, PLAUSIBILITY=False, REF=0, GREEDY=True, MIN_P=False,
                                     INF_UNDEFINED=False, BLOCK=2048), 8),
]


@pytest.mark.parametrize("case", range(len(FUSION_CASES)))
def test_fusion_kernels_compile_for_the_h100(case, tmp_path):
    name, dtypes, constexprs, num_warps = FUSION_CASES[case]
    assert_compiles_without_spills("collab_ops.triton.fusion_kernels", name,
                                   {**FUSION_SCALARS, **model_pointers(dtypes)}, constexprs, num_warps, tmp_path)


KD_FLAGS = dict(HAS_LABELS=True, HAS_SOFT=True, HAS_HARD=False, HARD_SHARES_SOFT_STATS=False, SOFTCAP_STUDENT=False,
                SOFTCAP_TEACHER=False, LOAD_STATS=False, STORE_STATS=True, WRITE_LOSS=True, WRITE_GRAD=True,
                BLOCK_V=4096)


DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_row_kernel_compiles_for_the_h100(divergence, tmp_path):
    from collab_ops.triton.kd_kernels import DIVERGENCE_CODES

    constexprs = dict(KD_FLAGS, DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_HARD=divergence == "forward_kl",
                      SOFTCAP_STUDENT=divergence == "jsd")
    assert_compiles_without_spills("collab_ops.triton.kd_kernels", "kd_rows_kernel", KD_SCALARS, constexprs, 8,
                                   tmp_path)


def test_gradient_scaling_kernel_compiles_for_the_h100(tmp_path):
    types = dict(grad_ptr="*bf16", grad_row_stride="i64", width="i32", scale_ptr="*fp32", scale_stride="i64")
    assert_compiles_without_spills("collab_ops.triton.kd_kernels", "scale_rows_kernel", types, dict(BLOCK_V=4096), 16,
                                   tmp_path)


if __name__ == "__main__":
    module, kernel_name, types, constexprs, num_warps, out = sys.argv[1:]
    compile_to_ptx(module, kernel_name, json.loads(types), json.loads(constexprs), int(num_warps), Path(out))
