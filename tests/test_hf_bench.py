"""bench/hf_bench.py at its quick shapes on the CPU: every processor matches its eager arithmetic,
and both trainers train, so the GPU run of the script measures what it claims."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (requirements-test.txt)")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import hf_bench  # noqa: E402


def test_quick_run_measures_every_processor_and_trainer(tmp_path):
    out = tmp_path / "hf.json"
    assert hf_bench.main([str(out), "--device", "cpu", "--quick"]) == 0
    results = json.loads(out.read_text())
    processors = results["processors"]
    assert {r["preset"] for r in processors} == {"proxy_tuning", "contrastive_decoding", "dynamic_fusion"}
    assert {r["implementation"] for r in processors} == {
        "collab_ops", "eager", "bookkeeping", "collab_ops, no row check", "eager, no row check",
        "bookkeeping, no row check", "replay"}
    assert all(r["matches_eager"] for r in processors)
    assert all(r["median_us"] > 0 for r in processors)
    trainers = {r["trainer"]: r for r in results["trainers"]}
    assert set(trainers) == {"DistillationTrainer", "full-logits Trainer"}
    # Same models, data, divergence and normalisation: the two losses agree.
    fused, full = (float(trainers[name]["final_loss"]) for name in ("DistillationTrainer", "full-logits Trainer"))
    assert fused == pytest.approx(full, rel=1e-3)
    assert "| proxy_tuning | 1 |" in out.with_suffix(".md").read_text()


def test_eager_contrastive_arithmetic_matches_the_preset():
    import torch

    from collab_ops import fuse_logits, presets

    generator = torch.Generator().manual_seed(0)
    expert, amateur = (torch.randn(3, 50, generator=generator) * 3 for _ in range(2))
    ours = fuse_logits([expert, amateur], output="logits", **presets.contrastive_decoding(alpha=0.1))
    assert hf_bench._same_distribution(ours, hf_bench.eager_contrastive(expert, [amateur], alpha=0.1))
    assert not hf_bench._same_distribution(ours, hf_bench.eager_contrastive(expert, [amateur], alpha=0.5))
