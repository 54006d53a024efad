"""Everyday failures stop with a message that names what is wrong, and leave nothing behind
(issue 13's table), and timed jobs never share the machine (issue 9's isolation)."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_snakemake

OFFLINE = ROOT / "config" / "offline-cpu.yaml"
TIMED = ("measure_bandwidth", "bench_baseline", "bench_lora", "profile_memory")


def test_timed_jobs_take_every_core_so_nothing_runs_beside_them(tmp_path):
    """With --cores 2 every timed job asks for both cores: Snakemake can schedule no other job
    (timed or not) beside it, while jobs of one core each still run two at a time."""
    proc = run_snakemake(tmp_path, "-n", "--cores", "2", configfile=OFFLINE, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    blocks = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n?)+)", proc.stdout, re.M)
    threads = {}
    for rule, body in blocks:
        m = re.search(r"^    threads: (\d+)$", body, re.M)
        threads.setdefault(rule, set()).add(int(m.group(1)) if m else 1)
    for rule in TIMED:
        assert threads[rule] == {2}, (rule, threads[rule])
    assert threads["make_adapter"] == {1} and threads["fetch_model"] == {1}


def test_presets_keep_their_results_apart(tmp_path):
    """Two presets planned in one working directory never name the same output."""
    outs = {}
    for preset, cfg in (("offline-cpu", OFFLINE), ("gpu-hub", ROOT / "config.yaml")):
        proc = run_snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:]
        outs[preset] = set(re.findall(r"^    output: (.*)$", proc.stdout, re.M))
        assert all(o.startswith(f"results/{preset}/") for line in outs[preset]
                   for o in line.split(", ")), preset
    assert not outs["offline-cpu"] & outs["gpu-hub"]


def test_truncated_result_json_stops_aggregate_naming_the_file(tmp_path):
    import aggregate
    bad = tmp_path / "results" / "bench" / "m" / "hf" / "baseline.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema": "bench/v2", "kind": "bench", "status": "o')
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*not valid JSON.*rerun"):
        aggregate.main([str(bad)], str(tmp_path / "tables"))
    assert not (tmp_path / "tables" / "bench.csv").exists()


def test_truncated_cached_weights_stop_the_bench_naming_file_and_remedy(tmp_path):
    """A cache entry damaged after it was written: the job that would read it writes an error
    result naming the file, both sizes and the remedy, instead of a safetensors traceback."""
    import bench
    import fetch_model
    import quantize
    from int4lora.config import job_plan
    arch = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "max_position_embeddings": 128}
    spec = {"source": "synthetic", "model_type": "llama", "arch": arch, "engines": ["hf"],
            "adapters": []}
    mj, qj = str(tmp_path / "model.json"), str(tmp_path / "quant.json")
    fetched = fetch_model.main("m", spec, str(tmp_path / "cache"), mj)
    engine = {"backend": "hf", "quantization": "nf4", "compute_dtype": "float32"}
    quantize.main("m", "hf", engine, mj, str(tmp_path / "cache"), qj)
    weights = next(Path(fetched["metrics"]["path"]).glob("*.safetensors"))
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    cfg = {"engines": {"hf": engine}, "adapters": {},
           "benchmark": {"batch_sizes": [1], "prompt_tokens": 8, "output_tokens": 2}}
    res = bench.main("m", "hf", job_plan(cfg, "m", "hf"), mj, qj,
                     {"batch_sizes": [1], "prompt_tokens": 8, "output_tokens": 2},
                     "cpu", str(tmp_path / "bench.json"))
    assert res["status"] == "error"
    assert str(weights) in res["reason"] and f"{size // 2} bytes, {size}" in res["reason"]
    assert f"delete {mj}" in res["reason"]


FAKE_ENGINE_JOB = textwrap.dedent('''
    import os, subprocess, sys, time, types
    sys.path.insert(0, sys.argv[1])
    from int4lora import smk
    from int4lora.config import engine_config

    class LLM:
        def __init__(self, **kw):
            # the engine core: a child process, as vLLM's
            self.core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open(sys.argv[2], "w").write(str(self.core.pid))
            outer = self
            class Core:
                def shutdown(self_inner):
                    outer.core.terminate(); outer.core.wait()
            self.llm_engine = types.SimpleNamespace(engine_core=Core())

    fake = types.ModuleType("vllm"); fake._is_fake = True; fake.LLM = LLM
    lora = types.ModuleType("vllm.lora"); req = types.ModuleType("vllm.lora.request")
    req.LoRARequest = object
    sys.modules.update({"vllm": fake, "vllm.lora": lora, "vllm.lora.request": req})

    def main(output):
        from int4lora.engines.vllm import VllmEngine
        from int4lora.resultio import write_json_atomic
        eng = VllmEngine(sys.argv[3], engine_config({"backend": "vllm", "quantization": "w4a16"}),
                         log_path=sys.argv[2] + ".log")
        try:
            time.sleep(600)  # timing the engine when the cancel arrives
            write_json_atomic(output, {"done": True})
        finally:
            eng.close()

    class Named(list):  # Snakemake's Namedlist, as far as smk.run reads it
        def keys(self):
            return []

    snake = types.SimpleNamespace(config={}, log=Named(), rule="bench", params=Named(),
                                  input=Named(), output=Named([sys.argv[2] + ".json"]),
                                  wildcards=Named())
    smk.run(snake, main)  # installs the SIGTERM handler, as in every rule script
''')


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_cancelled_vllm_job_leaves_no_engine_process_and_no_output(tmp_path, sig):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "mistral"}')
    script = tmp_path / "job.py"
    script.write_text(FAKE_ENGINE_JOB)
    marker = tmp_path / "core"
    # started as from a detached shell (`nohup ... &`): SIGINT ignored, which the job inherits
    job = subprocess.Popen([sys.executable, str(script), str(ROOT / "workflow" / "scripts"),
                            str(marker), str(model)],
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 60
    while not (marker.exists() and marker.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    core = int(marker.read_text())
    os.kill(core, 0)  # the engine core runs
    job.send_signal(sig)
    assert job.wait(timeout=60) != 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(core, 0)
    assert not Path(str(marker) + ".json").exists()
    assert not list(tmp_path.glob(".*.tmp"))
