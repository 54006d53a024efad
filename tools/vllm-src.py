"""vLLM's Python source at the version envs/vllm.yaml pins, unpacked for the CPU tests, with the
compressed-tensors that the same env pins.

Several tests check our code against vLLM's own (the expert-LoRA names its loader expects, the
worker attributes the applied-adapter report reads, the Punica kernel lookup the tuner patches,
how it parses a checkpoint's quantization_config). vLLM does not install on a CPU machine, but its
wheel is a zip on PyPI: this downloads it (about 300 MB, no dependencies) and unpacks only its
`.py` files into `.cache/vllm-src/vllm`, where tests/conftest.py looks first. Nothing is imported
from it; the tests read or compile single files. compressed-tensors (pure Python; vLLM 0.26 pins
0.17.0 while llmcompressor needs 0.19.0) goes to `.cache/vllm-src/ct/compressed_tensors`, for a
test that parses llmcompressor's checkpoints with it.

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


def pinned_version(package: str = "vllm") -> str:
    """A version the vllm conda env pins (the one fact; the GPU bundle agrees by test)."""
    return conda_env_pins(ENVS / "vllm.yaml")[1][package]


def version_marker() -> str:
    """What VERSION holds once both packages are unpacked at the env's pins."""
    return f"{pinned_version()} compressed-tensors {pinned_version('compressed-tensors')}"


def download_wheel(name: str, version: str, into: Path) -> Path:
    """A package's x86_64 (or pure-Python) wheel, from the package index, without dependencies."""
    platforms = [a for tag in manylinux_platforms(39) for a in ("--platform", tag)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", *platforms,
           "-d", str(into), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"pip could not download {name}=={version}: "
                           f"{proc.stderr.strip()[-1000:] or 'no wheel'}")
    return wheels[0]


def unpack_sources(wheel: Path, dest: Path, ct_wheel: Path | None = None) -> int:
    """The vLLM wheel's `vllm/**.py` files under dest, and the compressed-tensors wheel's package
    under dest/ct (written to a temp folder, then moved into place, so an interrupted run leaves
    no half tree); the count of vLLM files."""
    staging = Path(tempfile.mkdtemp(prefix=".vllm-src-", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as whl:
            names = [n for n in whl.namelist() if n.startswith("vllm/") and n.endswith(".py")]
            for name in names:
                whl.extract(name, staging)
        marker = wheel.name.split("-")[1]
        if ct_wheel is not None:
            with zipfile.ZipFile(ct_wheel) as whl:
                whl.extractall(staging / "ct", [n for n in whl.namelist()
                                                if n.startswith("compressed_tensors/")])
            marker += f" compressed-tensors {ct_wheel.name.split('-')[1]}"
        (staging / "VERSION").write_text(marker + "\n")
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
    version, ct_version = pinned_version(), pinned_version("compressed-tensors")
    marker = args.dest / "VERSION"
    if marker.is_file() and marker.read_text().strip() == version_marker():
        print(f"vLLM {version} source already in {args.dest}")
        return 0
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wheel = download_wheel("vllm", version, Path(tmp))
            ct_wheel = download_wheel("compressed-tensors", ct_version, Path(tmp))
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        count = unpack_sources(wheel, args.dest, ct_wheel)
    print(f"vLLM {version}: {count} source files in {args.dest / 'vllm'}; compressed-tensors "
          f"{ct_version} in {args.dest / 'ct'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
