"""vLLM's Python source at the version envs/vllm.yaml pins, unpacked for the CPU tests.

Several tests check our code against vLLM's own (the expert-LoRA names its loader expects, the
worker attributes the applied-adapter report reads, the Punica kernel lookup the tuner patches).
vLLM does not install on a CPU machine, but its wheel is a zip on PyPI: this downloads it
(about 300 MB, no dependencies) and unpacks only its `.py` files into `.cache/vllm-src/vllm`,
where tests/conftest.py looks first. Nothing is imported from it; the tests read or compile
single files.

    python tools/vllm-src.py            # unpack into .cache/vllm-src (once; later calls: no-op)
    python tools/vllm-src.py --dest D   # elsewhere
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from envpins import ENVS, conda_env_pins, manylinux_platforms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / ".cache" / "vllm-src"


def pinned_version() -> str:
    """The vLLM version the vllm conda env pins (the one fact; the GPU bundle agrees by test)."""
    return conda_env_pins(ENVS / "vllm.yaml")[1]["vllm"]


def download_wheel(version: str, into: Path) -> Path:
    """vLLM's x86_64 wheel for `version`, from the package index, without its dependencies."""
    platforms = [a for tag in manylinux_platforms(39) for a in ("--platform", tag)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", *platforms,
           "-d", str(into), f"vllm=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob(f"vllm-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"pip could not download vllm=={version}: "
                           f"{proc.stderr.strip()[-1000:] or 'no wheel'}")
    return wheels[0]


def unpack_sources(wheel: Path, dest: Path) -> int:
    """The wheel's `vllm/**.py` files under dest (written to a temp folder, then moved into
    place, so an interrupted run leaves no half tree); the count of files."""
    staging = Path(tempfile.mkdtemp(prefix=".vllm-src-", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as whl:
            names = [n for n in whl.namelist() if n.startswith("vllm/") and n.endswith(".py")]
            for name in names:
                whl.extract(name, staging)
        (staging / "VERSION").write_text(wheel.name.split("-")[1] + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    version = pinned_version()
    marker = args.dest / "VERSION"
    if marker.is_file() and marker.read_text().strip() == version:
        print(f"vLLM {version} source already in {args.dest}")
        return 0
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wheel = download_wheel(version, Path(tmp))
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        count = unpack_sources(wheel, args.dest)
    print(f"vLLM {version}: {count} source files in {args.dest / 'vllm'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
