"""Validation without a model: the noise floor (compare.py), the measurements validate.py takes
from scorings, and every verdict of judge.py on a passing and on a failing input.

Scorings are hand-made ScoredSequences, so every expected value is worked out by hand (or with
numpy, an independent percentile) and a check compared with the wrong side cannot pass.
"""
import math

import numpy as np
import pytest

import validate
from int4lora import compare, judge
from int4lora.config import with_defaults
from int4lora.engines.base import ScoredSequence

TH = with_defaults({}, "validation")["thresholds"]  # noise_k 2, effect_over_noise_min 10, ...
AD, CTL = "ad-0", validate.CONTROL
CONFIDENT = [-0.1, -3.0]   # the top token beats the runner-up by 2.9 nats
NEAR_TIE = [-0.70, -0.75]  # by 0.05 nats: below any margin


def seqs(*rows, tops=None):
    """One ScoredSequence per row of target log-probs; top-2 ids [1, 2] (or `tops`, a list of
    (ids, logprobs) per position, shared by every row) at every position."""
    out = []
    for row in rows:
        t = tops or [([1, 2], CONFIDENT)] * len(row)
        out.append(ScoredSequence(list(row), [list(i) for i, _ in t], [list(lp) for _, lp in t]))
    return out


def shifted(scores, *deltas):
    """The same sequences with target log-probs moved by `deltas` (one list per sequence)."""
    return [ScoredSequence([x + d for x, d in zip(s.target_logprobs, ds)], s.top_ids,
                           s.top_logprobs) for s, ds in zip(scores, deltas)]


def flipped(scores, positions):
    """The same sequences whose top-1 token changes at (sequence, position) pairs."""
    out = []
    for i, s in enumerate(scores):
        ids = [[b, a] if (i, p) in positions else [a, b] for p, (a, b) in enumerate(s.top_ids)]
        out.append(ScoredSequence(list(s.target_logprobs), ids, s.top_logprobs))
    return out


BASE = seqs([-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0])
ZERO = [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- noise floor

def test_noise_floor_exact_values():
    a = BASE
    b = shifted(BASE, [0.1, 0.0, 0.0], [0.0, -0.3, 0.0])
    c = shifted(BASE, [0.0, 0.2, 0.0], [0.0, 0.0, 0.05])
    floor = compare.noise_floor({"a": a, "b": b, "c": c}, TH["top1_margin"])
    pairs = [np.array([0.1, 0, 0, 0, -0.3, 0]), np.array([0, 0.2, 0, 0, 0, 0.05]),
             np.array([0.1, -0.2, 0, 0, -0.3, -0.05])]  # a-b, a-c, b-c (signs irrelevant)
    pooled = np.abs(np.concatenate(pairs))
    assert floor["pairs"] == 3 and floor["positions"] == 6
    assert floor["compositions"] == ["a", "b", "c"]
    assert floor["max"] == pytest.approx(0.3)
    # numpy's percentile, not ours: p99 of 18 values lies between the two largest (0.3, 0.3)
    # and the p50 among the zeros and small ones
    assert floor["p99"] == pytest.approx(np.percentile(pooled, 99))
    assert floor["p50"] == pytest.approx(np.percentile(pooled, 50))
    # the yardstick of an effect: the largest L2 norm of one pair's delta vector (b vs c)
    assert floor["norm_max"] == pytest.approx(math.sqrt(0.01 + 0.04 + 0.09 + 0.0025))
    assert floor["confident_flips"] == 0 and floor["confident_compared"] == 3 * 6


def test_noise_floor_p99_is_not_the_maximum():
    """Many small disagreements and one outlier: the p99 stays below the maximum."""
    row = [-1.0] * 100
    a = seqs(row)
    b = seqs([x + (0.5 if i == 0 else 0.01) for i, x in enumerate(row)])
    floor = compare.noise_floor({"a": a, "b": b}, TH["top1_margin"])
    assert floor["max"] == pytest.approx(0.5)
    assert floor["p99"] == pytest.approx(np.percentile([0.5] + [0.01] * 99, 99))
    assert floor["p99"] < 0.1


def test_noise_floor_counts_flips_only_at_confident_positions():
    tops = [([1, 2], CONFIDENT), ([1, 2], NEAR_TIE), ([1, 2], CONFIDENT)]
    a = seqs([-1.0, -1.0, -1.0], tops=tops)
    # b flips a near-tie (position 1) and a confident position (position 2)
    b = flipped(a, {(0, 1), (0, 2)})
    assert compare.confident_flips(a, b, a, 0.1) == (1, 2)
    floor = compare.noise_floor({"a": a, "b": b}, 0.1)
    assert (floor["confident_flips"], floor["confident_compared"]) == (1, 2)
    assert floor["confident_flip_rate"] == pytest.approx(0.5)


def test_noise_floor_needs_two_scorings_and_equal_lengths():
    with pytest.raises(ValueError, match="at least twice"):
        compare.noise_floor({"a": BASE}, 0.1)
    with pytest.raises(ValueError, match="6 and 3 positions"):
        compare.delta(BASE, BASE[:1])


# --------------------------------------------------------------------------- measurements

def engine_scorings(control=None, control_same=None, adapter_delta=0.4, multi=None):
    """What validate.engine_scorings returns, for a quiet engine (floor max 0.01): base requests
    in six compositions, the adapter moving every position by `adapter_delta`, and a zero-B
    control equal to the base (or `control` / `control_same` where given)."""
    noise = shifted(BASE, [0.01, 0, 0], ZERO)
    ad = shifted(BASE, [adapter_delta] * 3, [-adapter_delta] * 3)
    base = {"uniform": BASE, "reversed": noise, "one at a time": BASE,
            "mixed with adapter": BASE, "beside control (1)": BASE, "beside control (2)": noise}
    return {"base": base, "adapter": {"uniform": ad, "reversed": ad, "mixed with base": ad},
            "control": control or BASE, "control_same": control_same or BASE, "multi": multi,
            "storage": None, "adapter_name": AD, "ppl": {},
            "applied": {AD: {"applied": ["x.lora_A"], "unmatched": []},
                        CTL: {"applied": ["x.lora_A"], "unmatched": []}}}


def reference(adapter_delta=0.4):
    return {"base": BASE, "adapter": shifted(BASE, [adapter_delta] * 3, [-adapter_delta] * 3)}


CTX = {"moe": False, "real": False}


def checks_of(e, r=None, ctx=CTX):
    m = validate.measurements(e, r or reference(), ctx, TH)
    return m, {c["check_id"]: c for c in judge.judge(m, TH)}


def test_a_well_behaved_adapter_passes_every_check():
    m, checks = checks_of(engine_scorings())
    failed = [cid for cid, c in checks.items() if c["verdict"] == "FAIL"]
    assert failed == []
    assert m["floor"]["base"]["max"] == pytest.approx(0.01)
    # the adapter's effect, exactly: 0.4 at each of 6 positions
    assert m["adapter"]["max_abs_delta"] == pytest.approx(0.4)
    assert m["adapter"]["norm"] == pytest.approx(0.4 * math.sqrt(6))
    assert m["control"]["same_call_max"] == 0.0 and m["control"]["cross_call_max"] == 0.0
    assert m["agreement"]["effect_rel_error"] == pytest.approx(0.0)
    for cid in ("control.same_call", "control.cross_call", "control.top1",
                "adapter.moves_logprobs", "adapter.effect_over_noise", "adapter.applied"):
        assert checks[cid]["verdict"] == "PASS", cid


def test_a_control_with_nonzero_b_fails_both_control_checks():
    """A 'zero-B' control that is really the adapter: it moves log-probs by 0.4 in the same call
    and in separate calls, and flips two confident tokens."""
    moved = flipped(shifted(BASE, [0.4] * 3, ZERO), {(0, 0), (1, 2)})
    m, checks = checks_of(engine_scorings(control=moved, control_same=moved))
    assert m["control"]["same_call_max"] == pytest.approx(0.4)
    assert m["control"]["cross_call_max"] == pytest.approx(0.4)
    for cid in ("control.same_call", "control.cross_call"):
        assert checks[cid]["verdict"] == "FAIL", cid
        assert checks[cid]["value"] > checks[cid]["limit"]
        assert "LoRA path changes the output" in checks[cid]["reason"]
    assert (m["control"]["flips"], m["control"]["flips_compared"]) == (2, 6)
    top1 = checks["control.top1"]
    assert top1["verdict"] == "FAIL" and top1["value"] == pytest.approx(2 / 6)
    assert judge.overall(list(checks.values()), "base") == "PASS"
    assert judge.overall(list(checks.values())) == "FAIL"


def test_control_checks_each_look_at_their_own_call():
    """Same call: control vs the base request beside it; separate calls: the control's own call
    vs the base's. A difference in one must fail that check and only that one."""
    moved = shifted(BASE, [0.3, 0, 0], ZERO)
    _, same = checks_of(engine_scorings(control_same=moved))
    assert same["control.same_call"]["verdict"] == "FAIL"
    assert same["control.same_call"]["value"] == pytest.approx(0.3)
    assert same["control.cross_call"]["verdict"] == "PASS"
    _, cross = checks_of(engine_scorings(control=moved))
    assert cross["control.cross_call"]["verdict"] == "FAIL"
    assert cross["control.cross_call"]["value"] == pytest.approx(0.3)
    assert cross["control.same_call"]["verdict"] == "PASS"
    # flips alone (log-probs unchanged): only the top-1 check sees them
    _, flips = checks_of(engine_scorings(control=flipped(BASE, {(1, 1)})))
    assert flips["control.top1"]["verdict"] == "FAIL"
    assert flips["control.cross_call"]["verdict"] == "PASS"


def test_an_adapter_without_effect_fails_and_the_ratio_is_exact():
    _, none = checks_of(engine_scorings(adapter_delta=0.0), reference(0.0))
    assert none["adapter.moves_logprobs"]["verdict"] == "FAIL"
    assert none["adapter.effect_over_noise"]["verdict"] == "FAIL"
    assert none["adapter.effect_over_noise"]["value"] == 0.0
    m, good = checks_of(engine_scorings())
    # effect norm 0.4 x sqrt(6) over the floor's largest pair norm (0.01)
    ratio = good["adapter.effect_over_noise"]
    assert ratio["value"] == pytest.approx(0.4 * math.sqrt(6) / 0.01)
    assert ratio["floor"] == pytest.approx(0.01) == m["floor"]["base"]["norm_max"]


def test_effect_error_is_measured_against_the_reference_effect():
    m, checks = checks_of(engine_scorings(adapter_delta=0.4), reference(0.2))
    # engine effect 0.4, reference 0.2 at every position: |0.4 - 0.2| / 0.2 = 1
    assert m["agreement"]["effect_rel_error"] == pytest.approx(1.0)
    assert checks["adapter.agreement.effect"]["verdict"] == "FAIL"


def test_perplexity_ratio_is_int4_over_original_without_the_adapter():
    e = {**engine_scorings(), "ppl": {None: 12.0, AD: 30.0}}
    r = {**reference(), "original": BASE, "original_ppl": 10.0}
    m, checks = checks_of(e, r, {"moe": False, "real": True})
    assert m["quality"] == {"ppl_original": 10.0, "ppl_int4": 12.0, "ppl_int4_lora": 30.0,
                            "ppl_ratio": pytest.approx(1.2)}
    assert checks["base.quality.ppl_ratio"]["verdict"] == "PASS"
    assert checks["base.quantization.top1"]["value"] == 1.0


def test_multi_adapter_measurements_and_checks():
    c0 = shifted(BASE, [0.4] * 3, ZERO)
    c1 = shifted(BASE, ZERO, [0.4] * 3)
    c2 = shifted(BASE, [0.4, 0.4, 0.6], ZERO)  # closest to c0: pair norm 0.2
    alone = {"c0": c0, "c1": c1, "c2": c2}
    mixed = {"c0": shifted(c0, [0, 0.05, 0], ZERO), "c1": c1, "c2": c2}
    m, checks = checks_of(engine_scorings(multi={"alone": alone, "mixed": mixed}))
    assert m["multi"]["copies"] == ["c0", "c1", "c2"]
    assert m["multi"]["mixed_max"] == pytest.approx(0.05)
    assert m["multi"]["copies_min_norm"] == pytest.approx(0.2)
    # 0.05 > 2 x floor 0.01: the mixed batch changed c0's output
    assert checks["multi.mixed_batch"]["verdict"] == "FAIL"
    # min pair norm 0.2 over the floor's 0.01
    assert checks["multi.copies_differ"]["value"] == pytest.approx(20.0)
    assert checks["multi.copies_differ"]["verdict"] == "PASS"
    same = {"c0": c0, "c1": c0}  # one slot served both
    _, checks = checks_of(engine_scorings(multi={"alone": same, "mixed": same}))
    assert checks["multi.copies_differ"]["verdict"] == "FAIL"
    assert checks["multi.mixed_batch"]["verdict"] == "PASS"


def test_mixed_batch_is_judged_against_the_twin_slot_floor():
    """One adapter in every slot of one batch moved by 0.03 against itself alone: a batch of
    several active adapters has that spread without any adapter crossing, so the copies' 0.05 is
    within 2 x 0.03; the copies' distinctness is measured against the wider floor too."""
    c0 = shifted(BASE, [0.4] * 3, ZERO)
    c1 = shifted(BASE, ZERO, [0.4] * 3)
    alone = {"c0": c0, "c1": c1}
    mixed = {"c0": shifted(c0, [0, 0.05, 0], ZERO), "c1": c1}
    twins = {"alone": c0, "slot 1 of 2 in one batch": shifted(c0, [0, 0.03, 0], ZERO),
             "slot 2 of 2 in one batch": c0}
    m, checks = checks_of(engine_scorings(multi={"alone": alone, "mixed": mixed,
                                                 "twins": twins}))
    assert m["floor"]["multi"]["max"] == pytest.approx(0.03)
    assert m["floor"]["multi"]["compositions"] == list(twins)
    mixed_check = checks["multi.mixed_batch"]
    assert mixed_check["floor"] == pytest.approx(0.03)
    assert mixed_check["limit"] == pytest.approx(0.06) and mixed_check["verdict"] == "PASS"
    differ = checks["multi.copies_differ"]
    assert differ["floor"] == pytest.approx(0.03)
    assert differ["value"] == pytest.approx(compare.norm(compare.delta(c0, c1)) / 0.03)
    # twins that differ as much as the copies: the floor swallows the copies' difference, and
    # copies_differ says so instead of letting a batch that crosses adapters pass
    crossed = {"alone": c0, "slot 1 of 2 in one batch": c1, "slot 2 of 2 in one batch": c0}
    _, checks = checks_of(engine_scorings(multi={"alone": alone, "mixed": mixed,
                                                 "twins": crossed}))
    assert checks["multi.copies_differ"]["verdict"] == "FAIL"


# --------------------------------------------------------------------------- verdicts

FLOOR = {"max": 0.2, "p99": 0.05, "norm_max": 0.25, "confident_flip_rate": 0.0}


def measured(**over):
    """A measurements dict as validate.measurements makes it, with a vLLM-like noisy floor
    (max 0.2 nats); every check passes unless `over` changes it."""
    m = {"floor": {"base": dict(FLOOR)},
         "coverage": {"storage_known": True, "moe": False, "linear_share": 1.0},
         "adapter": {"max_abs_delta": 1.0, "norm": 5.0,
                     "applied": {"applied": ["a", "b"], "unmatched": []}},
         "control": {"same_call_max": 0.3, "cross_call_max": 0.3, "flips": 0,
                     "flips_compared": 10, "applied": {"applied": ["a", "b"], "unmatched": []}},
         "agreement": {"base": {"confident_top1_agreement": 0.9},
                       "adapter": {"confident_top1_agreement": 0.9},
                       "effect_rel_error": 0.5, "base_noise": 0.3},
         "real_weights": False, "quantization": {}, "quality": {}, "multi": None}
    for key, value in over.items():
        part, _, field = key.partition("__")
        if field:
            m[part] = {**m[part], field: value}
        else:
            m[key] = value
    return m


def by_id(m):
    return {c["check_id"]: c for c in judge.judge(m, TH)}


def test_limits_follow_the_noise_floor():
    # k x the floor's maximum (not its p99), never below the absolute limit
    assert judge.within_noise_limit(FLOOR, TH) == pytest.approx(2 * 0.2)
    assert judge.within_noise_limit({**FLOOR, "max": 0.0}, TH) == TH["control_max_logprob_diff"]
    assert judge.confident_margin(FLOOR, TH) == pytest.approx(0.4)
    assert judge.confident_margin({**FLOOR, "max": 0.0}, TH) == TH["top1_margin"]


def test_a_noisy_engine_passes_controls_within_k_times_its_floor():
    """vLLM W4A16: identical calls differ by up to 0.2; a control 0.3 off is within 2 x 0.2,
    and one 0.5 off is not."""
    checks = by_id(measured())
    for cid in ("control.same_call", "control.cross_call"):
        assert checks[cid]["verdict"] == "PASS" and checks[cid]["limit"] == pytest.approx(0.4)
    checks = by_id(measured(control__same_call_max=0.5, control__cross_call_max=0.5))
    assert checks["control.same_call"]["verdict"] == "FAIL"
    assert checks["control.cross_call"]["verdict"] == "FAIL"


def test_control_value_between_p99_and_max_passes():
    """Above k x p99 (0.1) but within k x max (0.4): the floor's maximum sets the limit."""
    checks = by_id(measured(control__same_call_max=0.15))
    assert checks["control.same_call"]["verdict"] == "PASS"


def test_over_noise():
    assert judge.over_noise(2.0, 4.0) == 0.5
    assert judge.over_noise(1.0, 0.0) == math.inf
    assert judge.over_noise(0.0, 0.0) == 0.0


def test_effect_over_noise_is_effect_divided_by_floor():
    checks = by_id(measured())
    assert checks["adapter.effect_over_noise"]["value"] == pytest.approx(5.0 / 0.25)
    assert checks["adapter.effect_over_noise"]["verdict"] == "PASS"
    weak = by_id(measured(adapter__norm=2.0))  # 8 x the noise: not clearly above it
    assert weak["adapter.effect_over_noise"]["value"] == pytest.approx(8.0)
    assert weak["adapter.effect_over_noise"]["verdict"] == "FAIL"


def test_verdict_boundaries_and_missing_values():
    assert judge.verdict("x", "base", "t", 1.0, ">=", 1.0)["verdict"] == "PASS"
    assert judge.verdict("x", "base", "t", 0.99, ">=", 1.0)["verdict"] == "FAIL"
    assert judge.verdict("x", "base", "t", 0.4, "<=", 0.4)["verdict"] == "PASS"
    failed = judge.verdict("x", "base", "t", 0.5, "<=", 0.4, reason="too far")
    assert failed["verdict"] == "FAIL" and failed["reason"] == "too far"
    assert judge.verdict("x", "base", "t", None, "<=", 0.4)["verdict"] == "N/A"
    assert judge.verdict("x", "base", "t", 0.1, "<=", 0.4, reason="r")["reason"] == ""


def test_applied_check_names_what_matched_nothing():
    ok = judge.applied_check("a", "t", {"applied": ["x", "y"], "unmatched": []})
    assert ok["verdict"] == "PASS" and ok["value"] == 1.0
    bad = judge.applied_check("a", "t", {"applied": ["x", "y", "z"],
                                         "unmatched": ["u1", "u2", "u3", "u4", "u5"]})
    assert bad["verdict"] == "FAIL" and bad["value"] == pytest.approx(3 / 8)
    assert "5 of 8" in bad["reason"] and "u1, u2, u3 (+2 more)" in bad["reason"]
    # nothing applied, nothing listed: the engine applied no adapter at all
    assert judge.applied_check("a", "t", {"applied": [], "unmatched": []})["verdict"] == "FAIL"
    assert judge.applied_check("a", "t", None)["verdict"] == "N/A"
    unmatched = measured(adapter__applied={"applied": ["a"], "unmatched": ["b"]})
    assert by_id(unmatched)["adapter.applied"]["verdict"] == "FAIL"


def test_control_top1_allows_no_flip():
    assert by_id(measured())["control.top1"]["value"] == 0.0
    one = by_id(measured(control__flips=1))["control.top1"]
    assert one["verdict"] == "FAIL" and one["value"] == pytest.approx(0.1)
    assert by_id(measured(control__flips_compared=0))["control.top1"]["verdict"] == "N/A"


def test_effect_error_limit_widens_with_the_base_error():
    checks = by_id(measured())
    effect = checks["adapter.agreement.effect"]
    # max(0.25, 2 x base noise 0.3): an effect error of 0.5 is within it
    assert effect["limit"] == pytest.approx(0.6) and effect["verdict"] == "PASS"
    tight = by_id(measured(agreement={**measured()["agreement"], "base_noise": 0.05}))
    assert tight["adapter.agreement.effect"]["limit"] == pytest.approx(0.25)
    assert tight["adapter.agreement.effect"]["verdict"] == "FAIL"


def test_quality_is_judged_on_real_weights_only():
    bad_quality = {"ppl_ratio": 9.0}
    synthetic = by_id(measured(quality=bad_quality,
                               quantization={"confident_top1_agreement": 0.1}))
    assert synthetic["base.quality.ppl_ratio"]["verdict"] == "N/A"
    assert synthetic["base.quantization.top1"]["verdict"] == "N/A"
    real = by_id(measured(quality=bad_quality, real_weights=True,
                          quantization={"confident_top1_agreement": 0.1}))
    assert real["base.quality.ppl_ratio"]["verdict"] == "FAIL"
    assert real["base.quantization.top1"]["verdict"] == "FAIL"
    good = by_id(measured(quality={"ppl_ratio": 1.1}, real_weights=True,
                          quantization={"confident_top1_agreement": 0.9}))
    assert good["base.quality.ppl_ratio"]["verdict"] == "PASS"


def test_moe_experts_left_16bit_fail_coverage():
    cov = {"storage_known": True, "moe": True, "linear_share": 1.0, "experts_share": 0.0}
    checks = by_id(measured(coverage=cov))
    assert checks["base.coverage.experts"]["verdict"] == "FAIL"
    assert "experts stay in 16-bit" in checks["base.coverage.experts"]["reason"]
    assert checks["base.coverage.linear"]["verdict"] == "PASS"
    assert by_id(measured(coverage={**cov, "experts_share": 1.0}))[
        "base.coverage.experts"]["verdict"] == "PASS"
    assert "base.coverage.experts" not in by_id(measured())


def test_multi_checks_pass_and_fail():
    assert "multi.mixed_batch" not in by_id(measured())
    good = by_id(measured(multi={"mixed_max": 0.3, "copies_min_norm": 5.0}))
    assert good["multi.mixed_batch"]["verdict"] == "PASS"
    assert good["multi.copies_differ"]["value"] == pytest.approx(20.0)
    assert good["multi.copies_differ"]["verdict"] == "PASS"
    bad = by_id(measured(multi={"mixed_max": 0.5, "copies_min_norm": 1.0}))
    assert bad["multi.mixed_batch"]["verdict"] == "FAIL"
    assert bad["multi.copies_differ"]["verdict"] == "FAIL"
    # the twin-slot floor widens both limits; without it (older results) the base floor alone
    wide = {**FLOOR, "max": 0.3, "norm_max": 0.5}
    twin = by_id(measured(multi={"mixed_max": 0.5, "copies_min_norm": 5.0},
                          floor={"base": FLOOR, "adapter": FLOOR, "multi": wide}))
    assert twin["multi.mixed_batch"]["limit"] == pytest.approx(0.6)
    assert twin["multi.mixed_batch"]["verdict"] == "PASS"
    assert twin["multi.copies_differ"]["value"] == pytest.approx(10.0)


def test_overall_by_scope():
    checks = judge.judge(measured(adapter__max_abs_delta=0.0), TH)
    assert judge.overall(checks) == "FAIL"
    assert judge.overall(checks, "adapter") == "FAIL"
    assert judge.overall(checks, "base") == "PASS"
    base_broken = judge.judge(measured(coverage={"storage_known": True, "moe": False,
                                                 "linear_share": 0.5}), TH)
    assert judge.overall(base_broken, "base") == "FAIL"
    assert judge.overall(judge.judge(measured(), TH)) == "PASS"


# every check of judge(): one input that must FAIL it (and only it), next to measured() above,
# which passes them all
AGREE = measured()["agreement"]
FAILING = {
    "base.coverage.linear": {"coverage": {"storage_known": True, "moe": False,
                                          "linear_share": 0.5}},
    "base.agreement.top1": {"agreement": {**AGREE, "base": {"confident_top1_agreement": 0.1}}},
    "adapter.applied": {"adapter__applied": {"applied": [], "unmatched": ["q.lora_A"]}},
    "adapter.moves_logprobs": {"adapter__max_abs_delta": 0.0},
    "adapter.effect_over_noise": {"adapter__norm": 0.5},
    "adapter.agreement.top1": {"agreement": {**AGREE,
                                             "adapter": {"confident_top1_agreement": 0.1}}},
    "adapter.agreement.effect": {"agreement": {**AGREE, "effect_rel_error": 0.9}},
    "control.applied": {"control__applied": {"applied": ["a"], "unmatched": ["b"]}},
    "control.same_call": {"control__same_call_max": 0.5},
    "control.cross_call": {"control__cross_call_max": 0.5},
    "control.top1": {"control__flips": 2},
}


# these fail with value and limit but no reason text (judge.py gives them none)
NO_REASON: set = set()  # every failing check says why


@pytest.mark.parametrize("check_id", sorted(FAILING))
def test_each_check_fails_on_its_own_failing_input(check_id):
    checks = by_id(measured(**FAILING[check_id]))
    failed = [cid for cid, c in checks.items() if c["verdict"] == "FAIL"]
    assert failed == [check_id]
    assert bool(checks[check_id]["reason"]) == (check_id not in NO_REASON)
    assert by_id(measured())[check_id]["verdict"] == "PASS"
