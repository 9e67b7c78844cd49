"""Writers for the results of a benchmark run: JSON (everything), a markdown table, a PNG plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

# Implementations in the order tables and plots show them; peers follow in the order measured.
LEADING_IMPLS = ("eager", "torch.compile", "collab_ops")


def write_json(results: dict, path: Path) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1, default=str) + "\n")
    temporary.replace(path)  # a run killed mid-write leaves the previous complete file


def _format_ms(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    if ms < 1000:
        return f"{ms:.3g} ms"
    return f"{ms / 1e3:.3g} s"


def _format_bytes(count: Optional[float]) -> str:
    if count is None:
        return "n/a"
    if count < 1 << 20:
        return f"{count / 1024:.0f} KiB"
    if count < 1 << 30:
        return f"{count / (1 << 20):.1f} MiB"
    return f"{count / (1 << 30):.2f} GiB"


def _impl_label(record: dict) -> str:
    backend = record.get("backend")
    return f"{record['impl']} ({backend})" if backend else record["impl"]


def _by_benchmark(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["benchmark"], []).append(record)
    return grouped


def _format_rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _format_speedup(ratio: float) -> str:
    return f"{ratio:.2f}×" if ratio >= 0.1 else f"{ratio:.2g}×"


def _format_percent(percent: float) -> str:
    return f"{percent:.1f}%" if percent >= 1 else f"{percent:.2g}%"


def _not_measured(records: list[dict]) -> list[str]:
    """One line per implementation and reason, naming the shapes only when not all are affected."""
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    affected: dict[tuple[str, str, str], list[str]] = {}
    for record in records:
        if record["status"] != "ok":
            label = _impl_label(record) if "impl" in record else "whole case"
            affected.setdefault((label, record["status"], record["reason"]), []).append(record["shape"])
    lines = []
    for (label, status, reason), where in affected.items():
        scope = "all shapes" if len(where) == len(shapes) else ", ".join(where)
        lines.append(f"- {label} ({scope}): {status}: {reason}")
    return lines


def write_markdown(results: dict, path: Path) -> None:
    env = results["environment"]
    ceiling = results["copy_ceiling"]
    memory_methods = list(dict.fromkeys(r["memory_method"] for r in results["records"] if r.get("memory_method")))
    lines = [
        f"# collab_ops benchmarks: {env['device']}{' (quick)' if results['run']['quick'] else ''}",
        "",
        f"{env['date']} · torch {env['torch']} (CUDA {env['torch_cuda']}) · triton {env['triton']} · "
        f"transformers {env['transformers']} · Python {env['python']} · {env['cpu_count']} CPUs · "
        f"commit {env['git_commit'] or 'none'}{' (dirty)' if env['git_dirty'] else ''}",
        "",
        "Backends: " + ", ".join(f"{name}: {state}" for name, state in env["backend_status"].items()),
        "",
        f"Copy-bandwidth ceiling: **{ceiling['gbps']:.1f} GB/s** ({ceiling['method']}). "
        f"GB/s of an op = ({results['bytes_moved_definition']}) / median time; speed-up = eager median / median.",
        "",
    ]
    if memory_methods:
        lines += ["Peak extra memory: " + "; ".join(memory_methods) + ".", ""]
    for bench_name, records in _by_benchmark(results["records"]).items():
        lines += [f"## {bench_name}", ""]
        measured = [r for r in records if "impl" in r]
        with_flops = any(r.get("tflops") for r in measured)
        header = ["op", "shape", "dtype", "impl", "median", "p20–p80", "GB/s", "% of ceiling"]
        header += ["TFLOP/s"] if with_flops else []
        header += ["speed-up vs eager", "peak extra memory"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for record in measured:
            op = record["op"] + (" (fwd+bwd)" if record["mode"] == "forward+backward" else "")
            row = [op, record["shape"], record["dtype"], _impl_label(record)]
            if record["status"] == "ok":
                row += [
                    _format_ms(record["median_ms"]),
                    f"{_format_ms(record['p20_ms'])} – {_format_ms(record['p80_ms'])}",
                    _format_rate(record["gbps"]),
                    _format_percent(100 * record["fraction_of_ceiling"]),
                ]
                row += [_format_rate(record["tflops"]) if record.get("tflops") else ""] if with_flops else []
                speedup = record.get("speedup_vs_eager")
                row += [_format_speedup(speedup) if speedup else "", _format_bytes(record.get("peak_extra_bytes"))]
            else:
                row += [record["status"]] + [""] * (len(header) - len(row) - 1)
            lines.append("| " + " | ".join(row) + " |")
        lines += [""]
        notes = _not_measured(records)
        if notes:
            lines += ["Not measured:", ""] + notes + [""]
    path.write_text("\n".join(lines))


def write_plot(results: dict, path: Path) -> Optional[str]:
    """Grouped bars of median time per shape and implementation, one panel per benchmark.

    Returns why no plot was written, or None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # matplotlib is a test dependency, not a runtime one
        return f"matplotlib is unavailable ({type(exc).__name__}: {exc})"

    panels = {
        name: [r for r in records if r.get("status") == "ok"]
        for name, records in _by_benchmark(results["records"]).items()
    }
    panels = {name: records for name, records in panels.items() if records}
    if not panels:
        return "no measurement succeeded"
    height_in = 3.6 * len(panels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, height_in), squeeze=False)
    palette = plt.get_cmap("tab10").colors
    colors = {impl: palette[index] for index, impl in enumerate(LEADING_IMPLS)}
    for axis, (name, records) in zip(axes[:, 0], panels.items()):
        shapes = list(dict.fromkeys(f"{r['shape']} {r['dtype']}" for r in records))
        impls = [i for i in LEADING_IMPLS if any(r["impl"] == i for r in records)]
        impls += list(dict.fromkeys(r["impl"] for r in records if r["impl"] not in impls))
        width = 0.8 / len(impls)
        for index, impl in enumerate(impls):
            by_shape = {f"{r['shape']} {r['dtype']}": r for r in records if r["impl"] == impl}
            xs = [s + (index - (len(impls) - 1) / 2) * width for s in range(len(shapes))]
            heights = [by_shape[s]["median_ms"] if s in by_shape else math.nan for s in shapes]
            color = colors.setdefault(impl, palette[len(colors) % len(palette)])
            bars = axis.bar(xs, heights, width=width, color=color,
                            label=next((_impl_label(r) for r in by_shape.values()), impl))
            axis.bar_label(bars, labels=[_format_ms(h) if h == h else "" for h in heights], fontsize=7)
        # On a log axis the bars' base is arbitrary; a floor well below the fastest keeps ratios readable.
        fastest = min(r["median_ms"] for r in records)
        slowest = max(r["median_ms"] for r in records)
        axis.set_yscale("log")
        axis.set_ylim(fastest / 4, slowest * 3)
        axis.set_ylabel("median time (ms)")
        axis.set_title(f"{name}: {records[0]['op']}, {records[0]['mode']}", fontsize=10)
        axis.set_xticks(range(len(shapes)))
        axis.set_xticklabels(shapes, fontsize=8)
        axis.legend(fontsize=8, loc="upper left")
        axis.grid(axis="y", which="major", alpha=0.3)
    env = results["environment"]
    figure.suptitle(f"collab_ops on {env['device']} · torch {env['torch']} · {env['date']}", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height_in))  # room for the title
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
