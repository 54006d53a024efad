"""cache_dir entries: a staged write leaves a manifest; a truncated, rewritten or missing file is
named with the remedy before a job reads it (int4lora.cache)."""
import json

import pytest

from int4lora import cache
from int4lora.resultio import ExpectedFailure


def _entry(tmp_path, files=None):
    target = tmp_path / "models" / "m-0123"
    with cache.staged(target) as staging:
        for rel, data in (files or {"model.safetensors": b"w" * 5000,
                                    "sub/config.json": b"{}"}).items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
    return target


def test_staged_entry_is_complete_and_intact(tmp_path):
    entry = _entry(tmp_path)
    assert cache.is_complete(entry) and cache.damage(entry) is None
    files = json.loads((entry / cache.MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "sub/config.json"}
    assert files["model.safetensors"]["bytes"] == 5000
    assert not (tmp_path / "models" / "m-0123.partial").exists()


def test_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "m-0123"
    with pytest.raises(RuntimeError):
        with cache.staged(target) as staging:
            (staging / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("killed")
    assert not target.exists() and not (tmp_path / "models" / "m-0123.partial").exists()


def test_truncated_file_is_named_with_both_sizes(tmp_path):
    entry = _entry(tmp_path)
    (entry / "model.safetensors").write_bytes(b"w" * 4000)
    why = cache.damage(entry)
    assert why == f"{entry / 'model.safetensors'}: 4000 bytes, 5000 when it was written " \
                  f"(truncated?)"


def test_same_size_rewrite_is_caught_by_the_sampled_hash(tmp_path):
    entry = _entry(tmp_path)
    (entry / "model.safetensors").write_bytes(b"v" + b"w" * 4999)
    assert cache.damage(entry) == f"{entry / 'model.safetensors'}: contents changed since it " \
                                  f"was written"


def test_missing_file_and_missing_manifest(tmp_path):
    entry = _entry(tmp_path)
    (entry / "sub" / "config.json").unlink()
    assert cache.damage(entry) == f"{entry / 'sub' / 'config.json'}: missing"
    (entry / cache.MANIFEST).unlink()
    assert "never finished" in cache.damage(entry)


def test_require_intact_stops_the_job_naming_file_and_remedy(tmp_path):
    entry = _entry(tmp_path)
    cache.require_intact(entry, "quantize")  # intact: nothing happens
    (entry / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExpectedFailure) as err:
        cache.require_intact(entry, "quantize", "results/quantize/m/vllm.json")
    assert err.value.status == "error"
    assert "0 bytes, 5000 when it was written" in err.value.reason
    assert "delete results/quantize/m/vllm.json" in err.value.reason
    with pytest.raises(ExpectedFailure, match=f"delete {entry} and rerun the quantize step"):
        cache.require_intact(entry, "quantize")
