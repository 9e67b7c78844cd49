"""Benchmark registry, timing, memory accounting and the run behind `python -m collab_ops bench`.

A benchmark declares its shapes per device and turns one shape into a `Case`: the public collab_ops
op and its baselines (naive eager PyTorch, the same function under torch.compile, peer libraries)
bound to the same inputs. Every implementation of a case is timed in the same process, one after
the other, so their numbers share the machine state, and each record says which backend dispatch
picked, or why an implementation was not measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from bench.peers import flashinfer_chain
from collab_ops import _dispatch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "bench" / "results"
RESULTS_SCHEMA_VERSION = 1

# A zero-argument call of one implementation, or the reason it cannot run here.
CallOrReason = Union[Callable[[], Any], str]

EAGER = "eager"
COMPILED = "torch.compile"
OURS = "collab_ops"


@dataclass
class Case:
    """One op at one shape, with every implementation bound to the same inputs."""

    op: str
    shape: str
    dtype: torch.dtype
    # What any implementation must move: every input read once plus every output written once.
    bytes_moved: int
    # Naive PyTorch: the speed-up baseline, and the function torch.compile compiles.
    eager: Callable[..., Any]
    eager_args: tuple
    ours: CallOrReason
    peers: dict[str, CallOrReason] = field(default_factory=dict)
    # Non-empty: every implementation returns a loss and is timed forward + backward to these.
    grad_wrt: tuple = ()
    flops: Optional[float] = None

    @property
    def mode(self) -> str:
        return "forward+backward" if self.grad_wrt else "forward"


@dataclass(frozen=True)
class Benchmark:
    name: str
    build_case: Callable[[dict, torch.device], Case]
    shapes: dict[str, tuple[dict, ...]]
    summary: str

    def shapes_for(self, device: torch.device, quick: bool) -> tuple[dict, ...]:
        return self.shapes["quick"] if quick else self.shapes[device.type]


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, *, cuda: list[dict], cpu: list[dict], quick: list[dict]):
    """Register `build_case(shape, device) -> Case` under `name`, with its shapes per device.

    `quick` shapes serve `--quick` on any device and must keep the whole quick run under a minute
    on two CPU cores.
    """

    def register(build_case: Callable[[dict, torch.device], Case]):
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice")
        summary = (build_case.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Benchmark(
            name=name,
            build_case=build_case,
            shapes={"cuda": tuple(cuda), "cpu": tuple(cpu), "quick": tuple(quick)},
            summary=summary[0] if summary else "",
        )
        return build_case

    return register


def public_op_call(family: str, op_name: str, *args, **kwargs) -> CallOrReason:
    """A call of `collab_ops.ops.<family>.<op_name>` on these arguments, or why it cannot be made.

    The op modules are imported here rather than at the top of the benchmark modules, so that the
    baselines of a family are still measured while its op does not import.
    """
    module_name = f"collab_ops.ops.{family}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a half-built tree fails with more than ImportError
        return f"{module_name} does not import ({type(exc).__name__}: {exc})"
    op = getattr(module, op_name, None)
    if op is None:
        return f"{module_name} has no {op_name}"
    return functools.partial(op, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    timer: str


def _quantile(sorted_values: list[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _summarize(times_ms: list[float], timer: str) -> Timing:
    ordered = sorted(times_ms)
    return Timing(
        median_ms=statistics.median(ordered),
        p20_ms=_quantile(ordered, 0.2),
        p80_ms=_quantile(ordered, 0.8),
        samples=len(ordered),
        timer=timer,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """GPU: triton.testing.do_bench (CUDA events, L2 flushed between runs); CPU: wall clock.

    Both expect the function to be warm (compiled, autotuned) already.
    """

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick

    def measure(self, fn: Callable[[], Any]) -> Timing:
        if self.device.type == "cuda":
            return self._measure_cuda(fn)
        return self._measure_wall_clock(fn)

    def _measure_cuda(self, fn: Callable[[], Any]) -> Timing:
        import triton.testing

        synchronize(self.device)
        start = time.perf_counter()
        fn()
        synchronize(self.device)
        estimate_ms = (time.perf_counter() - start) * 1e3
        # do_bench repeats for `rep` ms; a fixed 100 ms gives a 100 ms op a single sample, so the
        # window grows with the op, within bounds that keep the whole run short.
        if self.quick:
            warmup_ms, rep_ms = 5, min(max(5 * estimate_ms, 20.0), 300.0)
        else:
            warmup_ms, rep_ms = 25, min(max(20 * estimate_ms, 100.0), 2000.0)
        times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return _summarize(list(times), "triton.testing.do_bench")

    def _measure_wall_clock(self, fn: Callable[[], Any]) -> Timing:
        budget_s, min_runs, max_runs = (0.1, 1, 10) if self.quick else (1.0, 3, 50)
        times_ms: list[float] = []
        started = time.perf_counter()

        def wanted() -> bool:
            elapsed = time.perf_counter() - started
            # min_runs samples unless they would take more than three budgets: a slow op gets fewer.
            return not times_ms or elapsed < budget_s or (len(times_ms) < min_runs and elapsed < 3 * budget_s)

        while len(times_ms) < max_runs and wanted():
            start = time.perf_counter()
            fn()
            synchronize(self.device)
            times_ms.append((time.perf_counter() - start) * 1e3)
        return _summarize(times_ms, "wall clock")


# ----------------------------------------------------------------------------------------------
# Memory


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field_name}")
    return int(match.group(1))


def peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Optional[float], str]:
    """Bytes the call needs beyond what was allocated before it (outputs included), and how measured.

    CUDA: the caching allocator's peak. CPU: tracemalloc does not see torch's allocations, so this
    is the resident-set high-water mark (reset through /proc/self/clear_refs) above the resident set
    before the call; heap memory freed earlier but kept by malloc can hide part of the peak.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return float(peak), "torch.cuda.max_memory_allocated above the allocation before the call"
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        before_kib = _proc_status_kib("VmRSS")
        result = fn()
        peak_kib = _proc_status_kib("VmHWM")
    except OSError as exc:
        return None, f"not measured: the peak resident set cannot be reset here ({exc})"
    del result
    return float(max(peak_kib - before_kib, 0) * 1024), "resident-set high-water mark above the resident set before the call"


# ----------------------------------------------------------------------------------------------
# Which backend dispatch picked


def _backend_label(used: list[str]) -> str:
    distinct = list(dict.fromkeys(used))
    return "+".join(distinct) if distinct else "not observed"


# ----------------------------------------------------------------------------------------------
# Environment


def _package_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        completed = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: torch.device, quick: bool) -> str:
    name = device_name(device).lower()
    if device.type == "cpu" and "cpu" not in name:
        name = "cpu " + name
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug + "-quick" if quick else slug


def environment(device: torch.device) -> dict:
    import collab_ops

    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "transformers": _package_version("transformers"),
        "numpy": _package_version("numpy"),
        "liger_kernel": _package_version("liger-kernel") or _package_version("liger_kernel"),
        "flashinfer": _package_version("flashinfer-python") or _package_version("flashinfer"),
        # bench/peers: FlashInfer's speculative sampling kernel built from its headers (None: not built).
        "flashinfer_chain_kernel": flashinfer_chain.build_info(),
        "collab_ops": collab_ops.__version__,
        "backend_status": collab_ops.backend_status(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": bool(changes) if commit else None,
    }


def copy_bandwidth_ceiling(device: torch.device, timer: Timer) -> dict:
    """The bandwidth of a plain device-to-device copy, counting the read and the write.

    The destination is allocated once: on CPU a fresh one would time page faults, not the copy.
    """
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)
    timing = timer.measure(lambda: destination.copy_(source))
    del source, destination
    return {
        "gbps": 2 * nbytes / (timing.median_ms * 1e-3) / 1e9,
        "bytes_copied": nbytes,
        "median_ms": timing.median_ms,
        "timer": timing.timer,
        "method": "destination.copy_(source) on a preallocated float32 tensor; GB/s = 2 x bytes / median time",
    }


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class RunOptions:
    device: torch.device
    quick: bool = False
    only: Optional[list[str]] = None
    out_dir: Path = DEFAULT_OUT_DIR
    # Benchmarks (names or families) that time the torch.compile baseline: None for all, [] for none.
    compile_for: Optional[list[str]] = None
    time_budget_s: Optional[float] = None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _with_backward(call: Callable[[], Any], grad_wrt: tuple) -> Callable[[], Any]:
    if not grad_wrt:
        return call
    # autograd.grad returns the gradients instead of accumulating into .grad across repetitions.
    return lambda: torch.autograd.grad(call(), grad_wrt)


def _format_ms(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    if ms < 1000:
        return f"{ms:.2f} ms"
    return f"{ms / 1e3:.2f} s"


class _CaseRunner:
    def __init__(self, options: RunOptions, timer: Timer, ceiling_gbps: float):
        self.options = options
        self.timer = timer
        self.ceiling_gbps = ceiling_gbps
        self.device = options.device

    def implementations(self, bench: Benchmark, case: Case) -> list[tuple[str, CallOrReason, bool]]:
        """(impl name, call or reason, whether to observe dispatch), baseline first."""
        eager = functools.partial(case.eager, *case.eager_args)
        compile_for = self.options.compile_for
        if self.device.type != "cuda":
            compiled: CallOrReason = "not timed on CPU: compiling takes longer than the run on a small CPU"
        elif compile_for is not None and not any(_names(bench, wanted) for wanted in compile_for):
            compiled = "not selected for the torch.compile baseline in this run (--no-compile or --compile-only)"
        else:
            compiled = self._compiled(case)
        rows = [(EAGER, eager, False), (COMPILED, compiled, False), (OURS, case.ours, True)]
        rows += [(name, call, False) for name, call in case.peers.items()]
        return rows

    @staticmethod
    def _compiled(case: Case) -> Callable[[], Any]:
        # A fresh dynamo cache per case: static shapes, no recompile limit across cases, and the
        # first call's time is this case's compile time.
        torch._dynamo.reset()
        return functools.partial(torch.compile(case.eager, dynamic=False), *case.eager_args)

    def measure(self, case: Case, impl: str, call: CallOrReason, observe: bool) -> dict:
        record = {"impl": impl, "backend": None, "status": "ok", "reason": None}
        if isinstance(call, str):
            record.update(status="skipped", reason=call)
            return record
        timed = _with_backward(call, case.grad_wrt)
        try:
            with _dispatch.recording() if observe else contextlib.nullcontext([]) as chosen:
                start = time.perf_counter()
                result = timed()
                synchronize(self.device)
                record["first_call_s"] = time.perf_counter() - start
            del result
            if observe:
                record["backend"] = _backend_label([impl.backend for impl in chosen])
            peak_bytes, memory_method = peak_extra_memory(timed, self.device)
            timing = self.timer.measure(timed)
        except Exception as exc:  # an OOM or a failing op must not end the run
            record.update(status="error", reason=_first_line(exc))
            return record
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        seconds = timing.median_ms * 1e-3
        gbps = case.bytes_moved / seconds / 1e9
        record.update(
            median_ms=timing.median_ms,
            p20_ms=timing.p20_ms,
            p80_ms=timing.p80_ms,
            samples=timing.samples,
            timer=timing.timer,
            gbps=gbps,
            fraction_of_ceiling=gbps / self.ceiling_gbps,
            tflops=case.flops / seconds / 1e12 if case.flops else None,
            peak_extra_bytes=peak_bytes,
            memory_method=memory_method,
        )
        return record

    def run(self, bench: Benchmark, case: Case) -> list[dict]:
        common = {
            "benchmark": bench.name,
            "op": case.op,
            "shape": case.shape,
            "dtype": str(case.dtype).replace("torch.", ""),
            "mode": case.mode,
            "bytes_moved": case.bytes_moved,
            "flops": case.flops,
        }
        _progress(f"{bench.name}  {case.shape} {common['dtype']} {case.mode}:")
        records: list[dict] = []
        for impl, call, observe in self.implementations(bench, case):
            record = {**common, **self.measure(case, impl, call, observe)}
            eager = records[0] if records else record  # the eager baseline is measured first
            if record["status"] == "ok" and eager["status"] == "ok":
                record["speedup_vs_eager"] = eager["median_ms"] / record["median_ms"]
            records.append(record)
            _progress(" | " + _describe(record))
        _progress("\n")
        return records


def _describe(record: dict) -> str:
    label = record["impl"] + (f"[{record['backend']}]" if record.get("backend") else "")
    if record["status"] == "error":
        return f"{label} error ({record['reason'][:100]})"
    if record["status"] != "ok":
        return f"{label} {record['status']}"
    text = f"{label} {_format_ms(record['median_ms'])}"
    if record["impl"] != EAGER:
        text += f" {record['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in record else ""
    if record["impl"] == COMPILED:
        text += f" (compiled in {record['first_call_s']:.1f} s)"
    return text


def _progress(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def shape_text(shape: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in shape.items())


def _names(bench: Benchmark, wanted: str) -> bool:
    """Whether `wanted` is the benchmark's full name or its family (the part before the dot)."""
    return bench.name == wanted or bench.name.split(".")[0] == wanted


def select_benchmarks(only: Optional[list[str]]) -> list[Benchmark]:
    """The registered benchmarks named in `only` (full names or the family before the dot), or all."""
    import bench.benchmarks  # noqa: F401  (registers the benchmarks)

    if not only:
        return list(REGISTRY.values())
    chosen = []
    for wanted in only:
        matches = [b for b in REGISTRY.values() if _names(b, wanted)]
        if not matches:
            raise ValueError(f"no benchmark named {wanted!r}; known: {', '.join(REGISTRY)}")
        chosen += [b for b in matches if b not in chosen]
    return chosen


def run(options: RunOptions) -> dict:
    """Measure the selected benchmarks and write <out>/<device>.json, .md and .png as it goes."""
    from bench import report

    benchmarks = select_benchmarks(options.only)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    stem = options.out_dir / device_slug(options.device, options.quick)
    timer = Timer(options.device, options.quick)
    started = time.perf_counter()

    _progress(f"collab_ops bench on {device_name(options.device)}{' (quick)' if options.quick else ''}\n")
    ceiling = copy_bandwidth_ceiling(options.device, timer)
    _progress(f"copy bandwidth ceiling: {ceiling['gbps']:.1f} GB/s\n")
    results = {
        "schema": RESULTS_SCHEMA_VERSION,
        "environment": environment(options.device),
        "run": {
            "quick": options.quick,
            "benchmarks": [b.name for b in benchmarks],
            "compile_for": options.compile_for,
            "time_budget_s": options.time_budget_s,
        },
        "copy_ceiling": ceiling,
        "bytes_moved_definition": "every input read once plus every output written once",
        "records": [],
    }
    runner = _CaseRunner(options, timer, ceiling["gbps"])
    for bench in benchmarks:
        for shape in bench.shapes_for(options.device, options.quick):
            elapsed = time.perf_counter() - started
            if options.time_budget_s is not None and elapsed > options.time_budget_s:
                results["records"].append(
                    {"benchmark": bench.name, "shape": shape_text(shape), "status": "skipped",
                     "reason": f"time budget of {options.time_budget_s:.0f} s spent"}
                )
                continue
            try:
                case = bench.build_case(shape, options.device)
            except Exception as exc:
                results["records"].append(
                    {"benchmark": bench.name, "shape": shape_text(shape), "status": "error",
                     "reason": f"building the case failed: {_first_line(exc)}"}
                )
                _progress(f"{bench.name}  {shape_text(shape)}: building the case failed: {_first_line(exc)}\n")
                continue
            results["records"].extend(runner.run(bench, case))
            del case
            gc.collect()
            if options.device.type == "cuda":
                torch.cuda.empty_cache()
            results["run"]["wall_s"] = time.perf_counter() - started
            report.write_json(results, stem.with_suffix(".json"))
            report.write_markdown(results, stem.with_suffix(".md"))
        report.write_plot(results, stem.with_suffix(".png"))
    results["run"]["wall_s"] = time.perf_counter() - started
    report.write_json(results, stem.with_suffix(".json"))
    report.write_markdown(results, stem.with_suffix(".md"))
    plot_problem = report.write_plot(results, stem.with_suffix(".png"))
    if plot_problem:
        _progress(f"no plot: {plot_problem}\n")
    _progress(f"wrote {stem}.json, .md, .png in {results['run']['wall_s']:.1f} s\n")
    return results


def _comma_list(text: Optional[str]) -> Optional[list[str]]:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m collab_ops bench",
        description="Time collab_ops ops against naive PyTorch, torch.compile (CUDA) and peer libraries; "
        "write <out>/<device>.json, a markdown table and a PNG plot.",
    )
    parser.add_argument("--only", help="comma-separated benchmark names or families (e.g. fusion,distill.kd_loss)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (under a minute on 2 CPU cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help=f"output folder (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (it compiles every case)")
    parser.add_argument("--compile-only", metavar="NAMES",
                        help="time the torch.compile baseline only for these benchmark names or families")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no new case after this many seconds; the rest are recorded as skipped")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and their shapes, then exit")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    device = torch.device(device_type)
    only = _comma_list(args.only)
    try:
        benchmarks = select_benchmarks(only)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.list:
        for bench in benchmarks:
            print(f"{bench.name}: {bench.summary}")
            for key, shapes in bench.shapes.items():
                print(f"  {key}: " + "; ".join(shape_text(shape) for shape in shapes))
        return 0
    results = run(
        RunOptions(
            device=device,
            quick=args.quick,
            only=only,
            out_dir=args.out,
            compile_for=[] if args.no_compile else _comma_list(args.compile_only),
            time_budget_s=args.time_budget,
        )
    )
    failed = [r for r in results["records"] if r.get("impl") == OURS and r["status"] == "error"]
    for record in failed:
        print(f"collab_ops failed on {record['benchmark']} {record['shape']}: {record['reason']}", file=sys.stderr)
    return 1 if failed else 0
