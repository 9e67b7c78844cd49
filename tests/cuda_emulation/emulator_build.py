"""Builds the CUDA emulator extension (tests only): csrc/cuda's launchers with their kernel
launches rewritten as emulator calls, compiled as C++ with g++ together with emulated_ops.cpp.

    load() -> the module; pytest.skip only without a C++ compiler or ninja (a kernel the emulator
    cannot compile fails the tests, so that a new CUDA feature cannot silently skip them)
"""
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "cuda_emulation"

# kernel<...><<<grid, threads, shared, stream>>>(  ->  collab_emu::launch(kernel<...>, grid, threads, shared, stream)(
LAUNCH = re.compile(r"\b([A-Za-z_]\w*(?:<[^;{}()<>]*>)?)<<<(.*?)>>>\(", re.S)


def emulated_source(source: Path) -> str:
    text, launches = LAUNCH.subn(lambda m: f"collab_emu::launch({m.group(1)}, {m.group(2)})(", source.read_text())
    if "<<<" in text or launches == 0:
        raise RuntimeError(f"{source}: kernel launches not rewritten for the emulator")
    return text


def sources() -> list[Path]:
    BUILD.mkdir(parents=True, exist_ok=True)
    out = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        target = BUILD / f"emulated_{source.stem}.cpp"
        text = emulated_source(source)
        if not target.exists() or target.read_text() != text:  # keep the build cache valid
            target.write_text(text)
        out.append(target)
    return out + [HERE / "emulated_ops.cpp"]


def load():
    import pytest
    from torch.utils import cpp_extension

    # The pip-installed ninja sits next to the interpreter, which need not be on PATH.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the CUDA emulator needs {' and '.join(missing)}")
    return cpp_extension.load(
        name="collab_ops_cuda_emulated",
        sources=[str(s) for s in sources()],
        extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc")],
        extra_cflags=["-O1", "-ffp-contract=off", "-U_FORTIFY_SOURCE", "-include", "collab_cuda_emulation.h"],
        build_directory=str(BUILD),
        verbose=False,
    )
