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
