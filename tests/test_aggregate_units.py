"""aggregate.py on hand-made results: the overhead table's labels and ratios, and gate(), the
verdict every speed row carries (base rows: base-scope checks; adapter rows: that adapter's)."""
import pandas as pd
import pytest

import aggregate
from int4lora import harness


def _sample(variant, it, tpot):
    return {"variant": variant, "batch": 1, "iteration": it, "e2e_s": tpot * 10,
            "ttft_s": 0.1, "tpot_s": tpot, "excluded": None}


def test_overhead_rows_name_what_is_divided_by_what():
    samples = [s for i in range(4) for s in (_sample("lora-base", i, 0.010),
                                             _sample("lora-adapter", i, 0.0125))]
    res = {"model": "m", "engine": "hf", "adapter": "r16", "params": {},
           "metrics": {"overhead": harness.paired_overhead(samples, "lora-adapter",
                                                           "lora-base")}}
    (row,) = aggregate.overhead_rows(res)
    # the adapter's requests cost 25% more than base requests of the same engine
    assert (row["variant"], row["against"], row["batch"]) == ("lora-adapter", "lora-base", 1)
    assert row["tpot_ratio_median"] == pytest.approx(1.25)
    assert row["e2e_ratio_median"] == pytest.approx(1.25)
    assert row["ttft_ratio_median"] == pytest.approx(1.0)
    assert row["tpot_ratio_n"] == 4 and row["setting"] == "hf"


def _bench(*rows):
    return pd.DataFrame([{"model": m, "engine": "e", "adapter": a, "variant": v}
                         for m, a, v in rows])


def _checks(*rows):
    return pd.DataFrame([{"model": "m", "engine": "e", "adapter": a, "check_id": cid,
                          "scope": scope, "verdict": verdict}
                         for a, cid, scope, verdict in rows])


BENCH = _bench(("m", "none", "base"), ("m", "a1", "lora-base"), ("m", "a1", "lora-adapter"),
               ("m", "a2", "lora-adapter"), ("other", "none", "base"),
               ("other", "a1", "lora-adapter"))


def test_gate_a_failed_adapter_check_marks_only_that_adapters_rows():
    checks = _checks(("a1", "base.coverage.linear", "base", "PASS"),
                     ("a1", "control.same_call", "adapter", "FAIL"),
                     ("a2", "base.coverage.linear", "base", "PASS"),
                     ("a2", "control.same_call", "adapter", "PASS"))
    assert aggregate.gate(BENCH, checks) == ["PASS", "PASS", "FAIL", "PASS", "unvalidated",
                                             "unvalidated"]


def test_gate_a_failed_base_check_marks_every_row_of_the_model():
    checks = _checks(("a1", "base.coverage.experts", "base", "FAIL"),
                     ("a1", "control.same_call", "adapter", "PASS"),
                     ("a2", "base.coverage.experts", "base", "PASS"),
                     ("a2", "control.same_call", "adapter", "PASS"))
    # a2's validation came later and passed its base checks: the base still failed in a1's
    assert aggregate.gate(BENCH, checks) == ["FAIL", "FAIL", "FAIL", "PASS", "unvalidated",
                                             "unvalidated"]


def test_gate_without_validations():
    assert aggregate.gate(BENCH, pd.DataFrame()) == ["unvalidated"] * len(BENCH)
    assert aggregate.gate(pd.DataFrame(), pd.DataFrame()) == []


def test_rows_that_did_not_run_carry_no_verdict():
    """A lora-x4 row at batch 1 (not run) or an OOM row has no number: it is never shown as
    PASS even when the validation of its adapter passed."""
    import pandas as pd

    import aggregate
    bench = pd.DataFrame([
        {"model": "m", "engine": "e", "adapter": "a", "variant": "lora-adapter", "batch": 1,
         "status": "ok"},
        {"model": "m", "engine": "e", "adapter": "a", "variant": "lora-x4", "batch": 1,
         "status": "not run"},
        {"model": "m", "engine": "e", "adapter": "a", "variant": "lora-adapter", "batch": 64,
         "status": "oom"}])
    validation = pd.DataFrame([{"model": "m", "engine": "e", "adapter": "a", "scope": "adapter",
                                "verdict": "PASS"}])
    assert aggregate.gate(bench, validation) == ["PASS", "not run", "not run"]


def test_bench_memory_row_carries_the_engines_own_figures_for_the_source_table():
    """vLLM's own weights, KV pool and model-load figures reach the memory table, where the
    source-report comparison reads them (the vLLM report quotes all three)."""
    from int4lora import sources
    arch = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_size": 64}
    res = {"model": "q", "engine": "v", "adapter": "r16",
           "metrics": {"runs": [{"batch": 1, "prompt_tokens": 128, "output_tokens": 16,
                                 "status": "ok"}],
                       "memory": {"engine_model_weights_gib": 18.27, "engine_kv_cache_gib": 51.3,
                                  "engine_model_load_s": 5.53, "engine_cuda_graph_gib": 0.26,
                                  "nvml_device_used_bytes": 7.8e10},
                       "weight_storage": {"total_bytes": 19 * 2**30}, "adapter_bytes": 10,
                       "architecture": arch}}
    (row,) = aggregate.bench_memory_rows(res)
    assert row["engine_model_load_s"] == pytest.approx(5.53)
    frames = {"bench": pd.DataFrame(), "overhead": pd.DataFrame(), "memory": pd.DataFrame([row])}
    assert sources.our_figure("model_load_s", frames, "q", "v", "r16")[0] == pytest.approx(5.53)
    assert sources.our_figure("weights_gib", frames, "q", "v", "r16")[0] == pytest.approx(18.27)


def test_in_flight_bnb_weights_come_from_the_engine_not_zero():
    """vLLM's in-flight bitsandbytes has no 4-bit checkpoint to read (weight_storage None): its
    weights are the engine's loaded figure less the LoRA slot buffers (H100 run of 2026-11-25
    reported 0.00 GiB here), and unknown, not 0, where the engine gave none."""
    arch = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_size": 64}
    res = {"model": "m", "engine": "vllm-bnb", "adapter": "r16",
           "metrics": {"runs": [{"batch": 1, "prompt_tokens": 128, "output_tokens": 16,
                                 "status": "ok"}],
                       "memory": {"engine_model_weights_gib": 4.22, "engine_kv_cache_gib": 66.0},
                       "weight_storage": None, "adapter_bytes": 10,
                       "lora": {"buffer_bytes": 72 * 2**20}, "architecture": arch}}
    (row,) = aggregate.bench_memory_rows(res)
    assert row["weight_bytes"] == int(4.22 * 2**30) - 72 * 2**20
    res["metrics"]["memory"] = {}
    (row,) = aggregate.bench_memory_rows(res)
    assert row["weight_bytes"] is None


def _tsv(path, *seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["s\th:m:s\tmax_rss\tmax_vms"] + [f"{s}\t0:00:00\t100.5\t200" for s in seconds]
    path.write_text("\n".join(lines) + "\n")


def test_job_times_name_each_job_and_join_its_engine_start(tmp_path):
    root = tmp_path / "benchmarks"
    _tsv(root / "bench_lora" / "m" / "v" / "r16.tsv", 120.0)
    _tsv(root / "bench_baseline" / "m" / "v.tsv", 90.0, 80.0)  # a rerun appends a line
    _tsv(root / "make_adapter" / "m" / "r16.tsv", 20.0)
    _tsv(root / "aggregate.tsv", 1.0)
    env = {"started": "2026-11-25T13:00:00Z", "finished": "2026-11-25T13:02:00Z"}
    results = {("bench", "m", "v", "r16"): {
        "env": env, "metrics": {"engine_start_s": 95.0, "engine_info": {
            "engine_log": {"engine_init_s": 40.0, "compile_s": 30.0}}}}}
    rows = {(r["rule"], r["adapter"]): r for r in aggregate.job_time_rows(root, results)}
    lora = rows[("bench_lora", "r16")]
    assert (lora["model"], lora["engine"], lora["job_s"]) == ("m", "v", 120.0)
    assert (lora["engine_start_s"], lora["engine_init_s"], lora["compile_s"]) == (95.0, 40.0, 30.0)
    assert lora["started"] == env["started"]
    base = rows[("bench_baseline", "none")]
    assert (base["engine"], base["job_s"]) == ("v", 80.0) and "engine_start_s" not in base
    adapter = rows[("make_adapter", "r16")]
    assert (adapter["model"], adapter["engine"]) == ("m", None)
    assert rows[("aggregate", None)]["model"] is None
    from int4lora import views
    lead = views.job_time_lead(pd.DataFrame(list(rows.values())))
    assert lead.startswith("4 jobs took 3.7 min of job time") and "95–95 s" in lead


def test_engine_setting_names_the_checkpoint_the_engine_loaded():
    """Model entries of one preset can share weights (gpu-lora-cost's kernel sweep): the bench
    rows carry the checkpoint's cache entry so kernels are compared on the same weights."""
    res = {"engine": "vllm-exllama", "metrics": {"engine_info": {
        "setting": "W4A16 ExLlama", "llm_kwargs": {"model": "/c/models/mistral-de35658ab8e6"},
        "engine_log": {"w4a16_kernels": ["ExllamaLinearKernel"]}}}}
    got = aggregate.engine_setting(res)
    assert got["checkpoint"] == "mistral-de35658ab8e6"
    assert got["w4a16_kernel"] == "ExllamaLinearKernel"
    assert aggregate.engine_setting({"engine": "hf", "metrics": {}})["checkpoint"] is None


def test_missing_rows_name_kind_model_engine_and_adapter():
    """A partial report lists every result that did not run, by what it is; peer checks have no
    adapter level (results/<preset>/peer_check/<model>/<engine>.json)."""
    rows = aggregate.missing_rows([
        "results/gpu-smoke/bench/tiny-mixtral/vllm/r16-qv.json",
        "/abs/results/gpu-smoke/peer_check/tiny-mixtral/vllm.json",
        "results/gpu-smoke/tuning/tiny-mixtral/vllm-tuned/r16-experts.json"])
    got = [(r["kind"], r["model"], r["engine"], r["adapter"], r["status"]) for r in rows]
    assert got == [("bench", "tiny-mixtral", "vllm", "r16-qv", "missing"),
                   ("peer_check", "tiny-mixtral", "vllm", "–", "missing"),
                   ("tuning", "tiny-mixtral", "vllm-tuned", "r16-experts", "missing")]
