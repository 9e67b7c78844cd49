"""`python -m collab_ops {bench,demo,info}`: benchmarks, the demonstration of every method, what this build runs."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from pathlib import Path
from typing import Optional

# The bench package lives in the source tree next to this package, not in an installed wheel.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = SOURCE_ROOT / "bench"
DEFAULT_DEMO_OUT_DIR = Path("demo_results")  # relative to the working directory (git-ignored in the repository)


def _bench_harness():
    if not (BENCH_DIR / "harness.py").is_file():
        print(
            f"collab_ops bench needs the repository's source tree: {BENCH_DIR} is missing "
            "(an installed wheel does not ship the benchmarks). Run it from a checkout of the repository.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    sys.path.insert(0, str(SOURCE_ROOT))
    from bench import harness

    return harness


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    import torch

    import collab_ops

    print(f"collab_ops {collab_ops.__version__} ({Path(collab_ops.__file__).parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {_version('triton')}, transformers {_version('transformers')}")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    else:
        print("CUDA device: none visible")
    print("backends:")
    for backend, state in collab_ops.backend_status().items():
        print(f"  {backend:9s} {state}")
    return 0


def demo(quick: bool, device: Optional[str], out_dir: Path) -> int:
    from collab_ops.demo.runner import run

    info()
    print()
    run(quick=quick, device=device, out_dir=out_dir)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m collab_ops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,demo,info}")
    commands.add_parser(
        "bench", add_help=False,
        help="time the ops against their baselines (options: python -m collab_ops bench --help)",
    )
    demo_parser = commands.add_parser(
        "demo",
        help="every collaboration method on the embedded model family, then our kernels against eager PyTorch",
        description="Runs proxy-tuning, EFT, dynamic logits fusion, contrastive decoding, speculative decoding, "
        "distillation and weak-to-strong training on the model family shipped in collab_ops/demo (no "
        "download), prints a table per method and a kernel table, and writes demo.json and demo.png.",
    )
    demo_parser.add_argument("--quick", action="store_true",
                             help="fewer problems and training steps: a smoke run of every section in seconds")
    demo_parser.add_argument("--device", default=None, help="torch device (default: cuda when visible, else cpu)")
    demo_parser.add_argument("--out", type=Path, default=DEFAULT_DEMO_OUT_DIR,
                             help=f"where demo.json and demo.png go (default: ./{DEFAULT_DEMO_OUT_DIR})")
    commands.add_parser("info", help="print backend_status() and the versions of torch, triton, transformers")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        # The harness parses its own options, so `bench --help` shows them.
        return _bench_harness().main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return demo(args.quick, args.device, args.out)
    return info()


if __name__ == "__main__":
    sys.exit(main())
