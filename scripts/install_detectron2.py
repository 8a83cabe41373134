"""Install detectron2 into the running Python environment, as docs/detectron2.md describes.

1. An importable `detectron2` (e.g. a user's own source build with CUDA ops) is kept as it is.
2. Otherwise the pinned PyPI snapshot `pb1-detectron2==0.6` (upstream v0.6 without csrc) is
   downloaded, verified against its sha256, and its `detectron2/` package is installed as a
   pure-Python wheel named `detectron2` 0.6. lgd_cli.compat supplies what the missing
   compiled ops would have done.

Run with the interpreter of the target environment: `.venv/bin/python scripts/install_detectron2.py`.
Uses only the standard library and pip; torch must already be installed (the sdist's setup.py
imports it while pip reads its metadata).
"""
from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SNAPSHOT = "pb1-detectron2==0.6"
SNAPSHOT_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Runtime needs of detectron2 0.6 as pure Python; its setup.py also lists black==21.4b2,
# pydot, future and hydra-core, which only caffe2 export and config formatting use.
REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
]
PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "detectron2"
version = "0.6"
description = "detectron2 v0.6 Python sources (PyPI snapshot pb1-detectron2), no compiled ops"
requires-python = ">=3.8"
dependencies = {deps}

[tool.setuptools.packages.find]
include = ["detectron2*"]

[tool.setuptools.package-data]
"*" = ["*.yaml", "*.py"]
"""


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    if importlib.util.find_spec("detectron2") is not None:
        import detectron2  # noqa: F401  (only to report where it is)

        print(f"detectron2 {getattr(detectron2, '__version__', '?')} already installed at "
              f"{Path(detectron2.__file__).parent}: keeping it")
        return 0
    if importlib.util.find_spec("torch") is None:
        print("error: install torch first (the detectron2 sdist's setup.py imports it)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="lgd-d2-") as tmp:
        tmp = Path(tmp)
        pip("download", "--quiet", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
            SNAPSHOT, "-d", str(tmp / "sdist"))
        (archive,) = (tmp / "sdist").glob("*.tar.gz")
        actual = sha256_of(archive)
        if actual != SNAPSHOT_SHA256:
            print(f"error: {archive.name} has sha256 {actual}\n"
                  f"       expected {SNAPSHOT_SHA256} (the audited {SNAPSHOT} snapshot).\n"
                  "       Refusing to install it; see docs/detectron2.md.", file=sys.stderr)
            return 1
        with tarfile.open(archive) as tar:
            tar.extractall(tmp / "src", filter="data")
        (top,) = (tmp / "src").iterdir()
        build = tmp / "build"
        build.mkdir()
        (top / "detectron2").rename(build / "detectron2")
        (build / "pyproject.toml").write_text(PYPROJECT.format(deps=REQUIRES))
        pip("install", "--quiet", str(build))
    print("installed detectron2 0.6 (pure Python, from the verified PyPI snapshot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
