"""Install the requirements of a requirements file that are not installed yet.

A requirement counts as present when a distribution of that name is installed, whatever its
version: the GPU machine reaches no package index and brings its own torch, triton and
transformers, which must be kept. Only absent packages are installed with pip.
"""
import importlib.metadata
import re
import subprocess
import sys


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].strip()


def main(path: str) -> int:
    missing = []
    with open(path) as handle:
        for raw in handle:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                importlib.metadata.version(requirement_name(line))
            except importlib.metadata.PackageNotFoundError:
                missing.append(line)
    if not missing:
        print(f"ensure_deps: everything in {path} is installed")
        return 0
    print("ensure_deps: installing " + " ".join(missing), flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", *missing])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
