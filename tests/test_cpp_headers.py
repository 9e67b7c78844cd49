"""The torch-free headers under csrc/common, compiled with the host C++ compiler (as the CPU build
compiles them: no FMA contraction) and run: Philox against the Random123 known-answer vectors,
the Gumbel-max skip test and values_lse (tests/cpp)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")
@pytest.mark.parametrize("program", ["philox_known_answers", "sampling_header_checks"])
def test_header_checks(tmp_path, program):
    binary = tmp_path / program
    subprocess.run(
        ["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-I", str(ROOT / "csrc"),
         str(ROOT / f"tests/cpp/{program}.cpp"), "-o", str(binary)],
        check=True,
    )
    done = subprocess.run([str(binary)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout
