"""The Triton kernels compiled for the H100 (sm_90a) on a machine without a GPU: Triton lowers
them to PTX and its bundled ptxas assembles them, so a kernel that the interpreter runs but the
GPU compiler rejects (types, layouts, unsupported ops) fails here, in CI, and not first on the
GPU machine. ptxas also reports spills to local memory, which the kernels must not have.

The compilation runs in one child process for every case: the test session sets
TRITON_INTERPRET=1, under which `triton.jit` makes interpreter functions that cannot be compiled.

    python tests/test_triton_compile.py CASES.json OUT_DIR   # writes OUT_DIR/<case>.ptx or .error
"""
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

pytest.importorskip("triton")
from collab_ops.triton.distill import MAX_BLOCK_V_CUDA, NUM_WARPS_CUDA  # noqa: E402
from collab_ops.triton.kd_kernels import DIVERGENCE_CODES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

FUSION_SCALARS = dict(STRIDES="*i64", INV_T="*fp32", W="*fp32", w_row_stride="i64", MODEL_PARTIALS="*fp32",
                      MODEL_LSE="*fp32", SCORE_PARTIALS="*fp32", SCORE_MAX_PARTIALS="*fp32", CANDIDATE_KEYS="*fp32",
                      CANDIDATE_COLUMNS="*i32", SEED="*i64", seed_row_stride="i64", seed_spread="i64", TOKENS="*i64",
                      OUT="*fp32", V="i32", chunks="i32", chunk_columns="i32", log_alpha="fp32",
                      inv_temperature="fp32", log_min_p="fp32")
KD_SCALARS = dict(student_ptr="*bf16", student_row_stride="i64", teacher_ptr="*bf16", teacher_row_stride="i64",
                  labels_ptr="*i64", loss_ptr="*fp32", stats_ptr="*fp32", grad_ptr="*bf16", grad_row_stride="i64",
                  row_scale_ptr="*fp32", row_scale_stride="i64", vocab="i32", grad_width="i32", rows="i32",
                  inv_temperature="fp32", beta="fp32", soft_scale="fp32", hard_weight="fp32", softcap="fp32",
                  ignore_index="i64")


def compile_cases_to_ptx(cases: dict, out_dir: Path) -> None:
    """The child process's work: each case's PTX for sm_90a, or the error that stopped it."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, (module, kernel_name, types, constexprs, num_warps) in cases.items():
        try:
            kernel = getattr(importlib.import_module(module), kernel_name)
            signature = {arg: "constexpr" if arg in constexprs else types[arg] for arg in kernel.arg_names}
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=num_warps))
            (out_dir / f"{name}.ptx").write_text(compiled.asm["ptx"])
        except Exception:  # reported by the case's test
            (out_dir / f"{name}.error").write_text(traceback.format_exc())


def assert_assembles_without_spills(ptx_dir: Path, name: str, tmp_path: Path) -> None:
    error = ptx_dir / f"{name}.error"
    assert not error.exists(), error.read_text()[-4000:]
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    done = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx_dir / f"{name}.ptx"), "-o",
                           str(tmp_path / "kernel.cubin")], capture_output=True, text=True)
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
    ("model_lse_kernel", ["bf16"], dict(K=8, MERGE_STEP=128), 4),
    ("fuse_kernel", ["bf16"], dict(K=3, NORMALIZE=True, PLAUSIBILITY=False, REF=0, LOGPROBS=True,
                                   BLOCK=2048, MERGE_STEP=128), 8),
    ("fuse_kernel", ["fp32", "bf16", "fp16"], dict(K=8, NORMALIZE=False, PLAUSIBILITY=True, REF=7, LOGPROBS=False,
                                                   BLOCK=2048, MERGE_STEP=128), 8),
    ("fuse_kernel", ["bf16"], dict(K=1, NORMALIZE=True, PLAUSIBILITY=True, REF=0, LOGPROBS=False,
                                   BLOCK=256, MERGE_STEP=128), 1),
    ("fuse_finish_kernel", ["bf16"], dict(LOGPROBS=True, BLOCK=2048, MERGE_STEP=128), 8),
    ("fuse_finish_kernel", ["bf16"], dict(LOGPROBS=False, BLOCK=256, MERGE_STEP=128), 1),
    ("score_max_kernel", ["bf16", "fp32"], dict(K=2, NORMALIZE=False, PLAUSIBILITY=True, REF=0,
                                                BLOCK=2048, MERGE_STEP=128), 8),
    ("sample_kernel", ["bf16"], dict(K=3, NORMALIZE=False, PLAUSIBILITY=False, REF=0, GREEDY=False, MIN_P=False,
                                     BLOCK=2048, MERGE_STEP=128), 8),
    ("sample_kernel", ["bf16", "fp32"], dict(K=2, NORMALIZE=False, PLAUSIBILITY=True, REF=0, GREEDY=False, MIN_P=True,
                                             BLOCK=2048, MERGE_STEP=128), 8),
    ("sample_kernel", ["fp16"], dict(K=5, NORMALIZE=False, PLAUSIBILITY=False, REF=0, GREEDY=True, MIN_P=False,
                                     BLOCK=2048, MERGE_STEP=128), 8),
    ("pick_token_kernel", ["bf16"], dict(MERGE_STEP=128), 4),
]


KD_FLAGS = dict(HAS_LABELS=True, HAS_SOFT=True, HAS_HARD=False, HARD_SHARES_SOFT_STATS=False, SOFTCAP_STUDENT=False,
                SOFTCAP_TEACHER=False, LOAD_STATS=False, STORE_STATS=True, WRITE_LOSS=True, WRITE_GRAD=True,
                BLOCK_V=MAX_BLOCK_V_CUDA, PERSISTENT=False)


def all_cases() -> dict:
    """name -> (module, kernel, argument types, constexprs, num_warps)."""
    cases = {}
    for index, (kernel, dtypes, constexprs, num_warps) in enumerate(FUSION_CASES):
        cases[f"fusion-{index}"] = ("collab_ops.triton.fusion_kernels", kernel,
                                    {**FUSION_SCALARS, **model_pointers(dtypes)}, constexprs, num_warps)
    for divergence, code in DIVERGENCE_CODES.items():
        constexprs = dict(KD_FLAGS, DIVERGENCE=code, HAS_HARD=divergence == "forward_kl",
                          SOFTCAP_STUDENT=divergence == "jsd")
        cases[f"kd-{divergence}"] = ("collab_ops.triton.kd_kernels", "kd_rows_kernel", KD_SCALARS, constexprs,
                                     NUM_WARPS_CUDA)  # the launch configuration of rows of 4096+ columns
    cases["kd-jsd-persistent"] = ("collab_ops.triton.kd_kernels", "kd_rows_kernel", KD_SCALARS,
                                  dict(KD_FLAGS, DIVERGENCE=DIVERGENCE_CODES["jsd"], PERSISTENT=True), NUM_WARPS_CUDA)
    cases["kd-scale-rows"] = ("collab_ops.triton.kd_kernels", "scale_rows_kernel",
                              dict(grad_ptr="*bf16", grad_row_stride="i64", width="i32", scale_ptr="*fp32",
                                   scale_stride="i64"), dict(BLOCK_V=4096), 16)
    return cases


@pytest.fixture(scope="module")
def ptx_dir(tmp_path_factory):
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel brings no ptxas")
    out = tmp_path_factory.mktemp("ptx")
    (out / "cases.json").write_text(json.dumps(all_cases()))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, str(out / "cases.json"), str(out)], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", sorted(all_cases()))
def test_triton_kernels_compile_for_the_h100_without_spills(ptx_dir, name, tmp_path):
    assert_assembles_without_spills(ptx_dir, name, tmp_path)


if __name__ == "__main__":
    cases_file, out_dir = sys.argv[1:]
    compile_cases_to_ptx(json.loads(Path(cases_file).read_text()), Path(out_dir))
