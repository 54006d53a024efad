import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

import pytest  # noqa: E402

SNAKEFILE = ROOT / "Snakefile"
RESULT_SCHEMA = ROOT / "workflow" / "schemas" / "result.schema.json"

# vLLM's Python source at the pinned version (`python tools/vllm-src.py` unpacks it from PyPI;
# VLLM_SRC names another tree). Tests that check our code against vLLM's read single files from
# it; without it they skip, unless INT4LORA_REQUIRE_VLLM_SRC=1 (CI) makes that a failure.
VLLM_SRC = Path(os.environ.get("VLLM_SRC") or ROOT / ".cache" / "vllm-src" / "vllm")
REQUIRE_VLLM_SRC = os.environ.get("INT4LORA_REQUIRE_VLLM_SRC") == "1"


def load_tool(name: str):
    """A script of tools/ (names with hyphens too) as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"),
                                                  ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs_vllm_src(*relpaths: str):
    """Mark: skip (or, under INT4LORA_REQUIRE_VLLM_SRC=1, fail) unless these vLLM files exist."""
    missing = [p for p in relpaths or ("__init__.py",) if not (VLLM_SRC / p).is_file()]
    if missing and REQUIRE_VLLM_SRC:
        return pytest.mark.usefixtures("vllm_src_is_required")
    return pytest.mark.skipif(bool(missing), reason=f"vLLM source not unpacked ({VLLM_SRC}; "
                                                    f"python tools/vllm-src.py)")


@pytest.fixture
def vllm_src_is_required():
    without_vllm_src("the vLLM source")


def without_vllm_src(what: str):
    """Skip the calling test for want of `what` (fail instead under INT4LORA_REQUIRE_VLLM_SRC=1)."""
    message = f"{what} is missing under {VLLM_SRC} (python tools/vllm-src.py)"
    if REQUIRE_VLLM_SRC:
        pytest.fail(f"INT4LORA_REQUIRE_VLLM_SRC=1 but {message}")
    pytest.skip(message)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: runs the whole offline pipeline with Snakemake (minutes); "
                   "selected only with `-m integration`")


def pytest_collection_modifyitems(config, items):
    """Integration tests run only when asked for (`-m integration`), so that
    `pytest tests` stays fast."""
    if "integration" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="integration test: run with `-m integration`")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def result_validator():
    """A jsonschema validator for the result contract (workflow/schemas/result.schema.json)."""
    import json

    import jsonschema
    schema = json.loads(RESULT_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def run_snakemake(workdir, *args, configfile=None, timeout=600):
    """`python -m snakemake -s <repo>/Snakefile --directory <workdir> ...` as a subprocess;
    returns the CompletedProcess with stdout and stderr merged into .stdout."""
    import subprocess
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    cmd += [str(a) for a in args]
    return subprocess.run(cmd, cwd=str(workdir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def planned_jobs(output: str) -> list[dict]:
    """The jobs of a dry run's printout: [{"rule", "output": [...], "wildcards": {...}}]."""
    import re
    jobs = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n?)+)", output, re.M):
        job = {"rule": m.group(1), "output": [], "wildcards": {}}
        for line in m.group(2).splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "output":
                job["output"] = [v.strip() for v in value.split(",")]
            elif key == "wildcards":
                job["wildcards"] = dict(kv.split("=", 1) for kv in value.split(", "))
        jobs.append(job)
    return jobs


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: {rule: count}, without the total row."""
    import re
    m = re.search(r"^Job stats:\njob\s+count\n[- ]+\n((?:\S+\s+\d+\n)+)", output, re.M)
    if not m:
        return {}
    rows = dict(line.split() for line in m.group(1).splitlines())
    rows.pop("total", None)
    return {k: int(v) for k, v in rows.items()}


def install_fake_vllm(monkeypatch, llm_cls):
    """A stand-in `vllm` package (LLM, SamplingParams, LoRARequest) for testing the backend's
    own logic on a machine without vLLM; llm_cls plays vllm.LLM."""
    import types

    mod = types.ModuleType("vllm")
    mod._is_fake = True
    mod.__version__ = "0.26.0-fake"
    mod.LLM = llm_cls

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    mod.SamplingParams = SamplingParams
    lora = types.ModuleType("vllm.lora")
    req = types.ModuleType("vllm.lora.request")

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    req.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", req)
    llm_cls.instances.clear()
    return mod


# matplotlib's first cycle colour (C0, #1f77b4): every figure draws its first series in it,
# while a figure without data ("no ... rows") is text only
C0_RGB = (31, 119, 180)


def data_pixels(png) -> int:
    """Pixels of a PNG in matplotlib's C0 colour (within 2/255): 0 for an empty placeholder
    figure, thousands where a line, bar or marker was drawn."""
    import matplotlib.image
    import numpy as np
    rgb = (matplotlib.image.imread(str(png))[..., :3] * 255).round().astype(int)
    return int((np.abs(rgb - np.array(C0_RGB)).max(axis=-1) <= 2).sum())


@pytest.fixture(scope="session")
def pipe(tmp_path_factory):
    """The tiny models' results/ tree (test_scripts.Pipeline), built lazily, one per session."""
    from test_scripts import Pipeline
    p = Pipeline(tmp_path_factory.mktemp("pipeline"))
    p.model("tiny-llama")
    p.model("tiny-mixtral")
    return p
