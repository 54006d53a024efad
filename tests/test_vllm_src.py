"""tools/vllm-src.py: the vLLM wheel's Python files, unpacked whole or not at all."""
import zipfile

import pytest

from conftest import ROOT, load_tool

vllm_src = load_tool("vllm-src")


def _wheel(path, names):
    with zipfile.ZipFile(path, "w") as whl:
        for name in names:
            whl.writestr(name, f"# {name}\n")
    return path


def test_unpacks_only_vllm_python_files_and_records_the_version(tmp_path):
    wheel = _wheel(tmp_path / "vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl", [
        "vllm/__init__.py", "vllm/lora/utils.py", "vllm/_C.abi3.so",
        "vllm-0.26.0.dist-info/METADATA", "other/x.py"])
    dest = tmp_path / "src"
    (dest / "vllm").mkdir(parents=True)
    (dest / "vllm" / "stale.py").write_text("")
    ct_wheel = _wheel(tmp_path / "compressed_tensors-0.17.0-py3-none-any.whl", [
        "compressed_tensors/__init__.py", "compressed_tensors-0.17.0.dist-info/METADATA"])
    assert vllm_src.unpack_sources(wheel, dest, ct_wheel) == 2
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["VERSION", "ct/compressed_tensors/__init__.py", "vllm/__init__.py",
                     "vllm/lora/utils.py"]
    assert (dest / "VERSION").read_text() == "0.26.0 compressed-tensors 0.17.0\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".vllm-src-")] == []


def test_a_broken_wheel_leaves_the_old_tree_and_no_staging(tmp_path):
    broken = tmp_path / "vllm-0.26.0-x.whl"
    broken.write_bytes(b"not a zip")
    dest = tmp_path / "src"
    (dest / "vllm").mkdir(parents=True)
    (dest / "VERSION").write_text("0.25.0\n")
    with pytest.raises(zipfile.BadZipFile):
        vllm_src.unpack_sources(broken, dest)
    assert (dest / "VERSION").read_text() == "0.25.0\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".vllm-src-")] == []


def test_the_version_is_the_vllm_env_pin_and_a_match_downloads_nothing(tmp_path, monkeypatch):
    assert vllm_src.pinned_version() == "0.26.0"
    assert vllm_src.pinned_version("compressed-tensors") == "0.17.0"
    (tmp_path / "VERSION").write_text("0.26.0 compressed-tensors 0.17.0\n")
    monkeypatch.setattr(vllm_src, "download_wheel", lambda *a: pytest.fail("downloaded"))
    assert vllm_src.main(["--dest", str(tmp_path)]) == 0


@pytest.mark.parametrize("require, outcome", [("1", "1 error"), ("", "1 skipped")])
def test_a_missing_source_fails_where_it_is_required_and_skips_elsewhere(require, outcome):
    import os
    import subprocess
    import sys
    env = {**os.environ, "VLLM_SRC": "/nonexistent/vllm", "INT4LORA_REQUIRE_VLLM_SRC": require}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_architectures.py::test_registry_matches_vllm_source"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in proc.stdout, proc.stdout[-2000:]
    assert ("INT4LORA_REQUIRE_VLLM_SRC=1 but" in proc.stdout) == bool(require)
