"""The Triton KD kernels against the issue's GPU targets (run on the GPU test machine):

  fused_linear_kd_loss jsd(β=0.5) fwd+bwd, N=4096, H=4096, V=128256 bf16: ≤ 35 ms, ≤ 1.8 GiB extra peak
  kd_loss fwd+bwd on bf16 logits [4096, 128256]: ≥ 70% of copy bandwidth, counting the bytes that
  must move (read student and teacher, write the gradient) against a device-to-device copy.

Sweeps the fused form's chunk size and the row kernel's block/warps so the defaults in
collab_ops/triton/distill.py can be set from the numbers; `--programs` sweeps only the number of
persistent row programs (ROW_PROGRAMS, None = one per row), which bounds the row pairs in flight
and so whether the gradient pass's re-read of each row is served by L2. Prints one JSON object per
line; `--out FILE` also writes them as a JSON list.

    PYTHONPATH=. python bench/kd_triton_targets.py [--quick | --programs] [--out results.json]
"""
import argparse
import json

import torch
import triton.testing

from collab_ops.ops import distill as ops
from collab_ops.triton import distill as triton_distill

GIB = 2**30


def peak_extra_gib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / GIB


def fused_case(n, hidden, vocab):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0, grad=False):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).bfloat16().requires_grad_(grad)

    return dict(
        student_hidden=randn(n, hidden, grad=True),
        student_weight=randn(vocab, hidden, scale=2 * hidden**-0.5, grad=True),
        teacher_hidden=randn(n, hidden),
        teacher_weight=randn(vocab, hidden, scale=2.5 * hidden**-0.5),
    )


def bench_fused(results, chunk_sizes, n=4096, hidden=4096, vocab=128256):
    case = fused_case(n, hidden, vocab)

    def step(chunk_size):
        def run():
            loss = ops.fused_linear_kd_loss(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                                            case["teacher_weight"], divergence="jsd", beta=0.5,
                                            chunk_size=chunk_size, backend="triton")
            loss.backward()
            case["student_hidden"].grad = None
            case["student_weight"].grad = None
        return run

    for chunk_size in chunk_sizes:
        run = step(chunk_size)
        run()  # compile
        ms = triton.testing.do_bench(run, warmup=2, rep=20)
        results.append(dict(op="fused_linear_kd_loss", divergence="jsd", n=n, hidden=hidden, vocab=vocab,
                            chunk_size=chunk_size or "default", ms=round(ms, 2),
                            peak_extra_gib=round(peak_extra_gib(run), 3), target_ms=35.0, target_gib=1.8))
        print(json.dumps(results[-1]), flush=True)


def bench_kd_rows(results, configs, divergences, n=4096, vocab=128256):
    g = torch.Generator(device="cuda").manual_seed(1)
    student = (3 * torch.randn(n, vocab, generator=g, device="cuda")).bfloat16().requires_grad_(True)
    teacher = (3 * torch.randn(n, vocab, generator=g, device="cuda")).bfloat16()
    copy_src = torch.empty(n * vocab * 3, dtype=torch.bfloat16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = triton.testing.do_bench(lambda: copy_dst.copy_(copy_src), warmup=5, rep=50)
    copy_gbps = 2 * copy_src.numel() * 2 / copy_ms / 1e6
    needed_bytes = 3 * n * vocab * 2  # read student, read teacher, write the gradient
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for block, warps, programs in configs:
        triton_distill.MAX_BLOCK_V_CUDA, triton_distill.NUM_WARPS_CUDA = block, warps
        triton_distill.ROW_PROGRAMS = programs
        for divergence in divergences:
            def run():
                ops.kd_loss(student, teacher, divergence=divergence, beta=0.5, backend="triton").backward()
                student.grad = None
            run()
            ms = triton.testing.do_bench(run, warmup=3, rep=30)
            gbps = needed_bytes / ms / 1e6
            results.append(dict(op="kd_loss", divergence=divergence, n=n, vocab=vocab, block_v=block, num_warps=warps,
                                row_programs=programs or "one per row", sms=sms, ms=round(ms, 3),
                                effective_gbps=round(gbps), copy_gbps=round(copy_gbps),
                                fraction_of_copy=round(gbps / copy_gbps, 3), target_fraction=0.7))
            print(json.dumps(results[-1]), flush=True)
    triton_distill.ROW_PROGRAMS = None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="defaults only, no sweep")
    parser.add_argument("--programs", action="store_true", help="kd_loss only: sweep the persistent row programs")
    parser.add_argument("--out")
    args = parser.parse_args()
    results = []
    default = (triton_distill.MAX_BLOCK_V_CUDA, triton_distill.NUM_WARPS_CUDA)
    if args.programs:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        counts = [None] + [sms * share // 6 for share in (6, 5, 4, 3, 2)] + [2 * sms]
        bench_kd_rows(results, [(*default, programs) for programs in counts], ["forward_kl", "jsd"])
    elif args.quick:
        bench_kd_rows(results, [(*default, None)], ["forward_kl", "jsd"])
        bench_fused(results, [None])
    else:
        bench_kd_rows(results, [(4096, 16, None), (2048, 8, None), (4096, 8, None), (8192, 16, None)],
                      ["forward_kl", "jsd"])
        bench_fused(results, [None, 256, 1024])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
