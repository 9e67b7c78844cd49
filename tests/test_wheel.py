"""`pip wheel` builds collab_ops, and the wheel installs into a fresh virtual environment, loads,
and runs the quick demo on the model family it ships.

The fresh environment gets torch from the running interpreter's site-packages through a .pth
line (torch is a dependency, not what is under test); collab_ops itself comes only from the wheel.
"""
import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--quiet", "-w", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(dist.glob("collab_ops-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def fresh_python(built_wheel, tmp_path_factory) -> Path:
    """The python of a fresh virtual environment holding the wheel (torch and the other
    dependencies visible from this interpreter's site-packages)."""
    env_dir = tmp_path_factory.mktemp("fresh")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    torch_site = Path(torch.__file__).resolve().parent.parent
    Path(site, "torch_from_host.pth").write_text(f"{torch_site}\n")

    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", site, str(built_wheel)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def test_wheel_installs_into_a_fresh_venv_and_runs_a_kernel(fresh_python, tmp_path):
    env_dir = fresh_python.parent.parent
    check = textwrap.dedent(
        f"""
        import warnings
        warnings.simplefilter("error", RuntimeWarning)
        import torch, collab_ops
        assert collab_ops.__file__.startswith({str(env_dir)!r}), collab_ops.__file__
        assert "cpu" in collab_ops.available_backends(), collab_ops.backend_status()
        out = torch.ops.collab_ops.fuse_logits([torch.zeros(2, 4)], torch.ones(2, 1), [1.0], True, None, 0, 4, True)
        assert torch.allclose(out, torch.full((2, 4), -torch.log(torch.tensor(4.0)).item()))
        print("wheel ok")
        """
    )
    run = subprocess.run([str(fresh_python), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wheel ok" in run.stdout


def test_installed_wheel_runs_the_quick_demo_on_its_shipped_family(fresh_python, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="the demo's distillation uses transformers.Trainer")
    out = tmp_path / "demo_out"
    run = subprocess.run(
        [str(fresh_python), "-m", "collab_ops", "demo", "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    weights = fresh_python.parent.parent  # the family is loaded from the installed package
    assert f"loading the model family from {weights}" in run.stdout, run.stdout[:2000]
    results = json.loads((out / "demo.json").read_text())
    for section in ("behaviour_transfer", "contrastive_decoding", "speculative_decoding", "distillation",
                    "weak_to_strong", "kernels"):
        assert results[section], section
    assert all(row["identical_to_target_greedy"] == 1.0 for row in results["speculative_decoding"])
