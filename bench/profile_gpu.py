"""Where the time of each compiled GPU op goes: Python call vs CUDA-graph replay vs its kernels.

    python3 bench/profile_gpu.py OUT.json
    python3 bench/profile_gpu.py --once "B=128|B=64"   # each case matching a pattern called once (under ncu)

For each case: the median of the public call (`do_bench`, host overhead included when the GPU
waits for the host), the median replay of the same call captured in a CUDA graph (no host
overhead: what a serving engine's decoding loop pays), and torch.profiler's per-kernel device
times for one call. The harness in bench/harness.py stays the source of the published tables;
this script explains them.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import collab_ops  # noqa: E402
from collab_ops import presets  # noqa: E402

VOCAB = 152064
KD_VOCAB = 128256


def _logits(count, batch, vocab, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [(3 * torch.randn(batch, vocab, generator=generator, device="cuda")).to(dtype) for _ in range(count)]


def _speculative_inputs(batch, num_drafts, dtype, logits):
    generator = torch.Generator(device="cuda").manual_seed(1)
    target = torch.randn(batch, num_drafts + 1, VOCAB, device="cuda", generator=generator)
    draft = torch.randn(batch, num_drafts, VOCAB, device="cuda", generator=generator)
    if not logits:
        target, draft = target.softmax(-1), draft.softmax(-1)
    tokens = torch.randint(0, VOCAB, (batch, num_drafts), device="cuda", generator=generator)
    return tokens, target.to(dtype), draft.to(dtype)


def cases():
    seed = torch.tensor(7, dtype=torch.int64, device="cuda")
    proxy = presets.proxy_tuning(1.0)
    for batch in (1, 16, 128):
        logits = _logits(3, batch, VOCAB, torch.bfloat16)
        yield f"fused_sample proxy K=3 bf16 B={batch}", lambda l=logits: collab_ops.fused_sample(l, **proxy, seed=seed)
    wide = _logits(3, 128, VOCAB, torch.bfloat16)
    yield "fuse_logits proxy K=3 bf16 B=128 -> fp32", lambda: collab_ops.fuse_logits(wide, **proxy)
    large, expert, base = _logits(3, 16, VOCAB, torch.bfloat16)
    yield "dynamic_fusion_weights B=16 grid=21", lambda: collab_ops.dynamic_fusion_weights(large, [expert], base)
    for batch, dtype, from_logits in ((1, torch.float32, False), (64, torch.float32, False), (64, torch.bfloat16, True)):
        tokens, target, draft = _speculative_inputs(batch, 5, dtype, from_logits)
        inputs = "logits" if from_logits else "probs"
        yield (
            f"speculative_verify K=5 {inputs} {dtype} B={batch}",
            lambda t=tokens, p=target, q=draft, i=inputs: collab_ops.speculative_verify(t, p, q, inputs=i, seed=seed),
        )


def kernel_times(fn, calls=20):
    """Mean device time per call of each kernel name (and how many launches per call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time
            counts[event.name] += 1
    return [
        dict(kernel=name[:120], us_per_call=round(totals[name] / calls, 2), launches_per_call=counts[name] / calls)
        for name in sorted(totals, key=totals.get, reverse=True)
    ]


def graph_time_us(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1000 * do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


def main(out_path: str) -> int:
    results = []
    for name, fn in cases():
        row = dict(case=name, api_us=round(1000 * do_bench(fn, warmup=25, rep=200, return_mode="median"), 2))
        try:
            row["graph_us"] = round(graph_time_us(fn), 2)
        except Exception as error:  # a case that cannot be captured is a finding, not a crash
            row["graph_us"] = f"not capturable: {type(error).__name__}: {error}"[:200]
        row["kernels"] = kernel_times(fn)
        row["kernel_sum_us"] = round(sum(k["us_per_call"] for k in row["kernels"]), 2)
        print(json.dumps(row), flush=True)
        results.append(row)
    device = dict(name=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)
    Path(out_path).write_text(json.dumps(dict(device=device, results=results), indent=1))
    return 0


def run_once(patterns: str) -> int:
    """One call of each case whose name contains one of the '|'-separated `patterns`, after a warm-up
    outside the profiled range."""
    wanted = patterns.split("|")
    selected = [(name, fn) for name, fn in cases() if any(pattern in name for pattern in wanted)]
    for _, fn in selected:
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in selected:
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled once:", [name for name, _ in selected])
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--once":
        raise SystemExit(run_once(sys.argv[2]))
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "profile_gpu.json"))
