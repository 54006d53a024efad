"""The source reports' figures beside ours: matching, the derived overhead and the bandwidth
rescaling, on hand-made tables."""
import pandas as pd
import pytest

from int4lora import sources

SRC = [{"source": "S", "system": "Mistral", "shape": "mistral-7b", "engine": "hf",
        "gpu": "A100", "gpu_bandwidth_tb_s": 1.5,
        "figures": [{"metric": "decode_tok_s_b1_base", "value": 13.2},
                    {"metric": "lora_overhead_pct_b1", "value": 28.6},
                    {"metric": "peak_memory_gb_lora", "value": 4.61}]},
       {"source": "T", "system": "Qwen", "shape": "qwen2-32b", "engine": "vllm", "gpu": "H100",
        "gpu_bandwidth_tb_s": 2.0, "figures": [{"metric": "decode_tok_s_b1_lora", "value": 52}]}]
MODELS = {"m7": {"reference_shape": "mistral-7b", "engines": ["vllm", "hf", "hf-other"],
                 "adapters": ["r16-qv"]}}
ENGINES = {"vllm": {"backend": "vllm"}, "hf": {"backend": "hf"}, "hf-other": {"backend": "hf"}}


def _frames():
    bench = pd.DataFrame([
        {"model": "m7", "engine": "hf", "adapter": "none", "variant": "base", "batch": 1,
         "decode_tok_s_median": 30.0, "validated": "PASS"},
        {"model": "m7", "engine": "hf-other", "adapter": "none", "variant": "base", "batch": 1,
         "decode_tok_s_median": 99.0, "validated": "PASS"}])
    overhead = pd.DataFrame([{"model": "m7", "engine": "hf", "adapter": "r16-qv",
                              "variant": "lora-adapter", "batch": 1, "tpot_ratio_median": 1.25,
                              "validated": "FAIL"}])
    memory = pd.DataFrame([{"model": "m7", "engine": "hf", "adapter": "r16-qv",
                            "peak_bytes": 5.0e9}])
    return {"bench": bench, "overhead": overhead, "memory": memory}


def test_source_rows_match_convert_and_rescale():
    rows = sources.source_rows(SRC, _frames(), MODELS, ENGINES, bandwidth_bytes_s=3.0e12)
    by = {(r["source"], r["metric"]): r for r in rows}
    base = by[("S", "decode_tok_s_b1_base")]
    # the model's first engine of the source's backend (hf, not hf-other), gated
    assert base["our_value"] == 30.0 and base["our_config"] == "m7 / hf / r16-qv"
    assert base["validated"] == "PASS"
    # on the source's 1.5 TB/s GPU a bandwidth-bound decode would run at half our 3.0 TB/s speed
    assert base["bandwidth_normalised"] == pytest.approx(15.0)
    over = by[("S", "lora_overhead_pct_b1")]
    assert over["our_value"] == pytest.approx(25.0) and over["validated"] == "FAIL"
    assert over["bandwidth_normalised"] is None  # a ratio does not scale with bandwidth
    assert by[("S", "peak_memory_gb_lora")]["our_value"] == pytest.approx(5.0)
    # a memory figure carries no verdict (not "unvalidated"): checks gate speed figures
    assert by[("S", "peak_memory_gb_lora")]["validated"] is None
    # a source system this run does not have is listed, not dropped
    missing = by[("T", "decode_tok_s_b1_lora")]
    assert missing["our_value"] is None and missing["our_config"] == "not in this run"


def test_shipped_source_reports_load_and_name_known_metrics():
    shipped = sources.load_sources()
    metrics = {f["metric"] for s in shipped for f in s["figures"]}
    frames = {"bench": pd.DataFrame(), "overhead": pd.DataFrame(), "memory": pd.DataFrame()}
    for metric in metrics:  # every metric is one our_figure knows
        sources.our_figure(metric, frames, "m", "e", "a")
    assert {s["shape"] for s in shipped} == {"qwen2-32b", "mistral-7b", "mixtral-8x7b"}
