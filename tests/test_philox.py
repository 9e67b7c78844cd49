"""The torch-free Philox header reproduces the Random123 known-answer vectors (compiled with the host C++ compiler)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")
def test_philox_known_answers(tmp_path):
    binary = tmp_path / "philox_known_answers"
    subprocess.run(
        ["g++", "-std=c++17", "-O2", "-I", str(ROOT / "csrc"), str(ROOT / "tests/cpp/philox_known_answers.cpp"), "-o", str(binary)],
        check=True,
    )
    done = subprocess.run([str(binary)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout
