"""Checks of validate and bench on the real HF engine with inputs that must fail or that time
several adapters at once (the tiny pipeline of test_scripts.py, shared through `pipe`)."""
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import bench  # noqa: E402
import validate  # noqa: E402
from test_scripts import BENCH, VALIDATION, _adapter_tensors, _check, _read, plan  # noqa: E402


def test_validate_fails_a_control_whose_b_is_not_zero(pipe, result_validator):
    """The control checks on a failing input: a 'zero-B control' that is really the adapter
    (the make_adapter result pointed at a copy with non-zero B) must fail both of them."""
    pipe.quant("tiny-llama", "hf")
    res = pipe.adapter("tiny-llama", "r16-qv")
    broken = json.loads(json.dumps(res))
    broken["metrics"]["control_path"] = res["metrics"]["paths"][0]
    adapter_json = pipe.root / "scratch" / "adapter-nonzero-control.json"
    adapter_json.parent.mkdir(parents=True, exist_ok=True)
    adapter_json.write_text(json.dumps(broken))
    out = str(pipe.root / "scratch" / "validate-nonzero-control.json")
    val = validate.main("tiny-llama", "hf", plan("tiny-llama", "hf", "r16-qv"),
                        pipe.path("models", "tiny-llama.json"),
                        pipe.path("quantize", "tiny-llama", "hf.json"), str(adapter_json),
                        VALIDATION, "cpu", out)
    result_validator.validate(_read(out))
    assert val["status"] == "ok", val["reason"]
    m = val["metrics"]
    moved = m["lora"]["adapter"]["max_abs_delta"]
    for check in ("control.same_call", "control.cross_call"):
        c = _check(val, check)
        assert c["verdict"] == "FAIL", c
        # the 'control' moves log-probs exactly as far as the adapter does
        assert c["value"] == pytest.approx(moved, rel=1e-4) and c["value"] > c["limit"]
    assert {"control.same_call", "control.cross_call"} <= set(m["failed"])
    assert m["verdict"] == "FAIL" and m["verdict_base"] == "PASS"
    # the adapter itself is unchanged: its own checks still pass
    assert _check(val, "adapter.effect_over_noise")["verdict"] == "PASS"


MULTI_BENCH = {**BENCH, "multi_adapter": [2]}


def test_two_adapter_copies_bench_and_validate(pipe, result_validator):
    """lora-x2: two distinct copies in one batch, timed only where the batch holds two
    requests, with a paired overhead row; validation tells the copies apart."""
    pipe.quant("tiny-llama", "hf")
    pipe.bandwidth()
    made = pipe.adapter("tiny-llama", "r16-qv-x2")["metrics"]
    first, second = (_adapter_tensors(p) for p in made["paths"])
    assert set(first) == set(second) and any(
        not (first[k] == second[k]).all() for k in first if "lora_B" in k)
    job = plan("tiny-llama", "hf", "r16-qv-x2", bench_cfg=MULTI_BENCH)
    assert job["multi_adapter"] == [2]
    args = ("tiny-llama", "hf", job, pipe.path("models", "tiny-llama.json"),
            pipe.path("quantize", "tiny-llama", "hf.json"))
    adapter_json = pipe.path("adapters", "tiny-llama", "r16-qv-x2.json")
    out = str(pipe.root / "scratch" / "bench-x2.json")
    res = bench.main(*args, MULTI_BENCH, "cpu", out, adapter_json=adapter_json,
                     bandwidth_json=pipe.path("hardware", "bandwidth.json"))
    result_validator.validate(_read(out))
    assert res["status"] == "ok", res["reason"]
    m = res["metrics"]
    runs = {(r["variant"], r["batch"]): r for r in m["runs"]}
    assert runs[("lora-x2", 1)]["status"] == "not run"
    assert runs[("lora-x2", 2)]["status"] == "ok" and runs[("lora-x2", 2)]["tpot_s"]["n"] == 2
    assert runs[("lora-x2", 2)]["adapter_bytes_per_step"] == 2 * m["adapter_bytes"]
    assert {(o["numerator"], o["batch"]) for o in m["overhead"]} == {
        ("lora-adapter", 1), ("lora-adapter", 2), ("lora-x2", 2)}
    assert "lora-x2" not in m["outputs"]["1"]
    assert m["outputs"]["2"]["lora-x2"] != m["outputs"]["2"]["lora-base"]
    assert m["engine_info"]["adapters"] == ["r16-qv-x2-0", "r16-qv-x2-1"]
    out = str(pipe.root / "scratch" / "validate-x2.json")
    val = validate.main(*args, adapter_json, VALIDATION, "cpu", out)
    result_validator.validate(_read(out))
    assert val["status"] == "ok" and val["metrics"]["verdict"] == "PASS", val["metrics"]["failed"]
    assert val["metrics"]["lora"]["multi"]["copies"] == ["r16-qv-x2-0", "r16-qv-x2-1"]
    differ = _check(val, "multi.copies_differ")
    assert differ["verdict"] == "PASS" and differ["value"] >= differ["limit"]
    assert _check(val, "multi.mixed_batch")["verdict"] == "PASS"
    # the mixed batch's own floor: copy 0 under a second LoRA id, both in one batch
    assert val["metrics"]["engine_info"]["adapters"] == [
        "r16-qv-x2-0", "r16-qv-x2-1", "r16-qv-x2-0-twin1", "control-zero-b"]
    twins = val["metrics"]["noise_floor"]["multi"]
    assert twins["compositions"] == ["alone", "slot 1 of 2 in one batch",
                                     "slot 2 of 2 in one batch"]
    assert _check(val, "multi.mixed_batch")["floor"] >= twins["max"]


def test_vllm_inflight_bnb_is_validated_against_the_nf4_weights_it_serves(pipe):
    """vLLM's in-flight bitsandbytes loads bf16 weights (no quantization_config) and quantizes
    them as NF4 with double quant: the reference is the HF engine's NF4 model, not a
    compressed-tensors reader (the H100 run's KeyError: 'quantization_config')."""
    from int4lora.config import engine_config
    from int4lora.engines.hf_engine import HfEngine
    model_path = pipe.model("tiny-llama")["metrics"]["path"]
    adapter = pipe.adapter("tiny-llama", "r16-qv")["metrics"]["paths"][0]
    seqs = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]]
    ctx = {"reference_adapter": ("a", adapter), "model_path": model_path,
           "quant_path": model_path, "seqs": seqs, "top_k": 3, "real": False}
    got = validate.run_reference(engine_config({"backend": "vllm", "quantization": "bitsandbytes"}),
                                 ctx, "cpu")
    nf4 = HfEngine.reference(model_path, model_path, {"a": adapter}, "cpu")
    plain = HfEngine(model_path, quantization="none", compute_dtype="float32", device="cpu")
    try:
        want = nf4.score(seqs, ["a", "a"], 3)
        unquantized = plain.score(seqs, [None, None], 3)
    finally:
        nf4.close(), plain.close()
    assert [s.target_logprobs for s in got["adapter"]] == [s.target_logprobs for s in want]
    assert [s.target_logprobs for s in got["base"]] != [s.target_logprobs for s in unquantized]
