"""Compile-only check of the torch-free CUDA sources with nvcc (no GPU, no torch headers).

Every csrc/cuda/*.cuh must compile on its own (self-contained headers) and every csrc/cuda/*.cu
(the torch-free launchers, which instantiate the kernels) must compile to an object file, with no
kernel spilling registers to local memory (ptxas -v).
Architecture: the first entry of TORCH_CUDA_ARCH_LIST (default 9.0a).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def nvcc_arch() -> str:
    first = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a").replace(";", " ").split()[0]
    first = first.replace("+PTX", "")
    suffix = "a" if first.endswith("a") else ""
    major, minor = first.rstrip("a").split(".")
    return f"sm_{major}{minor}{suffix}"


def compile_unit(nvcc: str, source: Path, arch: str, workdir: str) -> tuple[Path, int, str]:
    obj = Path(workdir) / (source.name + ".o")
    cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-I", str(CSRC), "-c", str(source), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return source, done.returncode, done.stdout + done.stderr


def spilling_kernels(ptxas_report: str) -> list[str]:
    """Kernels for which ptxas -v reports spill stores."""
    spilling, function = [], None
    for line in ptxas_report.splitlines():
        named = re.search(r"Function properties for (\S+)", line)
        if named:
            function = named.group(1)
        spills = re.search(r"(\d+) bytes spill stores", line)
        if spills and int(spills.group(1)) > 0:
            spilling.append(f"{function}: {line.strip()}")
    return spilling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nvcc", default="nvcc")
    args = parser.parse_args()
    arch = nvcc_arch()
    with tempfile.TemporaryDirectory() as workdir:
        units = sorted((CSRC / "cuda").glob("*.cu"))
        for header in sorted((CSRC / "cuda").glob("*.cuh")):
            unit = Path(workdir) / f"include_{header.stem}.cu"
            unit.write_text(f'#include "cuda/{header.name}"\n')
            units.append(unit)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            results = list(pool.map(lambda u: compile_unit(args.nvcc, u, arch, workdir), units))
    failed = [(src, out) for src, code, out in results if code != 0]
    for src, code, out in results:
        spilling = spilling_kernels(out) if code == 0 else []
        if spilling:
            failed.append((src, "spills registers:\n" + "\n".join(spilling)))
    for src, out in failed:
        print(f"FAILED {src.relative_to(ROOT) if src.is_relative_to(ROOT) else src.name}:\n{out}", file=sys.stderr)
    print(f"check_cuda_headers: {len(results) - len(failed)}/{len(results)} CUDA units compile for {arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
