"""The benchmark harness on CPU: records, output files, environment, and the command line."""
from __future__ import annotations

import functools
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import bench.benchmarks  # noqa: E402,F401  (registers the real benchmarks)
from bench import harness  # noqa: E402

CPU = torch.device("cpu")


def _register(name: str, build_case, **shapes):
    harness.benchmark(name, **shapes)(build_case)
    return harness.REGISTRY[name]


@pytest.fixture
def tiny_benchmark():
    """Softmax, forward and forward + backward, with one installed and one missing peer."""

    def softmax_loss(x):
        return torch.softmax(x, dim=-1).square().sum()

    def build(shape, device):
        x = torch.randn(shape["rows"], shape["cols"], device=device, requires_grad=shape["backward"])
        eager = softmax_loss if shape["backward"] else functools.partial(torch.softmax, dim=-1)
        return harness.Case(
            op="softmax",
            shape=f"rows={shape['rows']} cols={shape['cols']}",
            dtype=x.dtype,
            bytes_moved=2 * x.numel() * x.element_size(),
            eager=eager,
            eager_args=(x,),
            ours=functools.partial(eager, x),
            peers={"absent-peer": "not installed", "present-peer": functools.partial(eager, x)},
            grad_wrt=(x,) if shape["backward"] else (),
            flops=5.0 * x.numel(),
        )

    shapes = [dict(rows=4, cols=33, backward=False), dict(rows=8, cols=65, backward=True)]
    bench = _register("test.tiny_softmax", build, cuda=shapes, cpu=shapes, quick=shapes[:1])
    yield bench
    harness.REGISTRY.pop(bench.name)


@pytest.fixture
def failing_benchmark():
    def fail():
        raise RuntimeError("kernel exploded")

    def build(shape, device):
        x = torch.ones(3, device=device)
        return harness.Case(op="broken", shape="n=3", dtype=x.dtype, bytes_moved=12,
                            eager=torch.neg, eager_args=(x,), ours=fail)

    bench = _register("test.failing_op", build, cuda=[{}], cpu=[{}], quick=[{}])
    yield bench
    harness.REGISTRY.pop(bench.name)


def test_run_records_every_implementation_and_writes_outputs(tiny_benchmark, tmp_path):
    results = harness.run(harness.RunOptions(device=CPU, only=[tiny_benchmark.name], out_dir=tmp_path))

    stem = tmp_path / harness.device_slug(CPU, quick=False)
    assert json.loads(stem.with_suffix(".json").read_text())["records"] == json.loads(json.dumps(results["records"]))
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = stem.with_suffix(".md").read_text()
    assert f"## {tiny_benchmark.name}" in markdown and "not installed" in markdown

    env = results["environment"]
    for key in ("device", "torch", "triton", "transformers", "python", "backend_status", "cpu_count", "date", "git_commit"):
        assert key in env
    assert env["backend_status"]["reference"] == "available"
    ceiling = results["copy_ceiling"]["gbps"]
    assert ceiling > 0

    records = results["records"]
    assert [r["impl"] for r in records] == ["eager", "torch.compile", "collab_ops", "absent-peer", "present-peer"] * 2
    assert [r["mode"] for r in records[::5]] == ["forward", "forward+backward"]
    for record in records:
        if record["impl"] == "torch.compile":
            assert record["status"] == "skipped" and "CPU" in record["reason"]
        elif record["impl"] == "absent-peer":
            assert record["status"] == "skipped" and record["reason"] == "not installed"
        else:
            assert record["status"] == "ok", record
            assert record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
            assert record["samples"] >= 3 and record["timer"] == "wall clock"
            assert record["gbps"] == pytest.approx(record["bytes_moved"] / (record["median_ms"] * 1e-3) / 1e9)
            assert record["fraction_of_ceiling"] == pytest.approx(record["gbps"] / ceiling)
            assert record["tflops"] > 0
            assert record["peak_extra_bytes"] is not None or record["memory_method"].startswith("not measured")
    eager = [r for r in records if r["impl"] == "eager"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in eager)
    # The plain function has no collab_ops dispatch to observe, and says so.
    assert {r["backend"] for r in records if r["impl"] == "collab_ops"} == {"not observed"}


def test_failing_op_is_recorded_and_fails_the_command(failing_benchmark, tmp_path, capsys):
    exit_code = harness.main(["--only", failing_benchmark.name, "--device", "cpu", "--quick", "--out", str(tmp_path)])

    assert exit_code == 1
    results = json.loads((tmp_path / f"{harness.device_slug(CPU, quick=True)}.json").read_text())
    ours = next(r for r in results["records"] if r["impl"] == "collab_ops")
    assert ours["status"] == "error" and "kernel exploded" in ours["reason"]
    assert next(r for r in results["records"] if r["impl"] == "eager")["status"] == "ok"
    assert "kernel exploded" in capsys.readouterr().err


def test_time_budget_skips_remaining_cases(tiny_benchmark, tmp_path):
    results = harness.run(
        harness.RunOptions(device=CPU, only=[tiny_benchmark.name], out_dir=tmp_path, time_budget_s=0.0)
    )
    assert [r["status"] for r in results["records"]] == ["skipped", "skipped"]
    assert all("time budget" in r["reason"] for r in results["records"])


def test_unknown_benchmark_is_a_usage_error(tmp_path, capsys):
    assert harness.main(["--only", "no.such.benchmark", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "fusion.proxy_tuning_sample" in capsys.readouterr().err


def test_bench_without_the_source_tree_exits_2(monkeypatch, tmp_path, capsys):
    entry = importlib.import_module("collab_ops.__main__")
    monkeypatch.setattr(entry, "BENCH_DIR", tmp_path / "bench")
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["bench", "--quick"])
    assert exit_info.value.code == 2
    assert "source tree" in capsys.readouterr().err


def _fusion_ops_import_error():
    try:
        importlib.import_module("collab_ops.ops.fusion")
    except Exception as exc:
        return f"collab_ops.ops.fusion does not import: {exc}"
    return None


@pytest.mark.skipif(_fusion_ops_import_error() is not None, reason=str(_fusion_ops_import_error()))
def test_quick_fusion_benchmark_from_the_command_line(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "collab_ops", "bench", "--quick", "--device", "cpu",
         "--only", "fusion.proxy_tuning_sample", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "fusion.proxy_tuning_sample" in completed.stderr  # one progress line per case
    results = json.loads((tmp_path / f"{harness.device_slug(CPU, quick=True)}.json").read_text())
    ours = [r for r in results["records"] if r["impl"] == "collab_ops"]
    assert len(ours) == len(harness.REGISTRY["fusion.proxy_tuning_sample"].shapes["quick"])
    for record in ours:
        assert record["status"] == "ok", record
        assert set(record["backend"].split("+")) <= {"reference", "cpu"}, record["backend"]


def test_the_flashinfer_peer_names_what_is_missing(tmp_path, monkeypatch):
    from bench.peers import flashinfer_chain

    monkeypatch.setenv("COLLAB_OPS_FLASHINFER_CHAIN", str(tmp_path / flashinfer_chain.LIBRARY_FILE))
    ids, target, draft = torch.zeros(1, 2, dtype=torch.long), torch.rand(1, 3, 4), torch.rand(1, 2, 4)
    assert "build_flashinfer_chain.sh" in flashinfer_chain.peer_call(ids, target, draft)
    assert flashinfer_chain.build_info() is None
    (tmp_path / flashinfer_chain.LIBRARY_FILE).write_bytes(b"not a shared library")
    assert "does not load" in flashinfer_chain.peer_call(ids, target, draft)
