"""Fast unit tests of the pure helpers in workflow/scripts/int4lora and the quantize script.

No model is loaded here except a few tiny torch modules; the byte tokenizer is the real one
that synthetic models ship with.
"""
import json
import math
import re

import pytest

from int4lora import coverage, harness, memory, resultio, stats
from int4lora.engines.base import BatchTiming


# --------------------------------------------------------------------------- stats

def test_summarize_known_sample_matches_numpy_percentiles():
    np = pytest.importorskip("numpy")
    values = [float(v) for v in range(1, 11)]  # 1..10
    s = stats.summarize(reversed(values))  # order must not matter
    assert s["n"] == 10
    assert s["median"] == 5.5
    assert s["p90"] == pytest.approx(9.1)
    assert s["p99"] is None  # 10 samples: a "p99" would be the maximum under another name
    assert s["mean"] == 5.5
    assert s["std"] == pytest.approx(math.sqrt(8.25))  # population std
    assert (s["min"], s["max"]) == (1.0, 10.0)
    for q in (0, 10, 50, 90, 99, 100):
        assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q))
    big = stats.summarize(float(v) for v in range(1, 101))
    assert big["p99"] == pytest.approx(np.percentile(range(1, 101), 99))


@pytest.mark.parametrize("n,has_p90,has_p99,has_ci", [(4, False, False, False),
                                                      (5, False, False, True),
                                                      (9, False, False, True),
                                                      (10, True, False, True),
                                                      (99, True, False, True),
                                                      (100, True, True, True)])
def test_percentiles_and_ci_only_where_n_supports_them(n, has_p90, has_p99, has_ci):
    s = stats.summarize(float(v) for v in range(n))
    assert (s["p90"] is not None, s["p99"] is not None) == (has_p90, has_p99)
    assert (s["ci_low"] is not None) == has_ci
    assert s["min"] == 0 and s["max"] == n - 1 and s["n"] == n


def test_bootstrap_ci_of_the_median_covers_it_and_narrows_with_n():
    import random
    rng = random.Random(1)
    small = [rng.gauss(10, 1) for _ in range(10)]
    large = small + [rng.gauss(10, 1) for _ in range(190)]
    lo_s, hi_s = stats.bootstrap_ci(small)
    lo_l, hi_l = stats.bootstrap_ci(large)
    assert lo_s <= stats.summarize(small)["median"] <= hi_s
    assert lo_l < 10 < hi_l  # the true median
    assert hi_l - lo_l < (hi_s - lo_s) / 2
    assert stats.bootstrap_ci(small) == (lo_s, hi_s)  # seeded: reruns agree
    # a constant sample has a zero-width interval
    assert stats.bootstrap_ci([2.0] * 8) == (2.0, 2.0)


def _distribution_free_ci(n: int, level: float) -> tuple[int, int]:
    """Ranks (0-based) of the order statistics that bound the median with `level` confidence
    whatever the distribution (binomial, p = 1/2)."""
    from math import comb
    cdf, tail = 0.0, (1 - level) / 2
    for k in range(n + 1):
        cdf += comb(n, k) / 2 ** n
        if cdf > tail:
            return k, n - 1 - k
    raise AssertionError("unreachable")


@pytest.mark.parametrize("level", [0.95, 0.90])
def test_bootstrap_ci_has_its_stated_coverage(level):
    """On 0..400 the bootstrap interval of the median lies within one rank of the exact
    distribution-free interval of the same level (95%: ranks 181 and 219; a 90% interval
    would be 184 and 216)."""
    values = [float(v) for v in range(401)]
    low, high = _distribution_free_ci(len(values), level)
    got = stats.bootstrap_ci(values, level) if level != stats.CI_LEVEL \
        else stats.summarize(values)
    got = (got["ci_low"], got["ci_high"]) if isinstance(got, dict) else got
    assert abs(got[0] - low) <= 1 and abs(got[1] - high) <= 1, (got, (low, high))


def test_paired_ratio_ci():
    base = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02]
    adapter = [b * 1.2 for b in base]  # exactly +20% in every pair, whatever the drift
    r = stats.ratio_spread(adapter, base)
    assert r["median"] == pytest.approx(1.2) and r["n"] == 8
    assert r["ci_low"] == pytest.approx(1.2) and r["ci_high"] == pytest.approx(1.2)
    noisy = stats.ratio_spread([1.1, 1.3, 1.2, 1.25, 1.15, 1.22], [1.0] * 6)
    assert noisy["ci_low"] < noisy["median"] < noisy["ci_high"]
    with pytest.raises(ValueError, match="3 numerators for 2 denominators"):
        stats.ratio_spread([1, 2, 3], [1, 2])


def test_summarize_drops_missing_and_non_finite_values():
    s = stats.summarize([2.0, None, float("nan"), float("inf"), 4.0])
    assert s["n"] == 2
    assert s["median"] == 3.0
    assert s["max"] == 4.0


def test_summarize_empty_and_single():
    empty = stats.summarize([])
    assert empty["n"] == 0
    assert all(empty[k] is None for k in ("median", "p90", "p99", "mean", "std", "min", "max"))
    one = stats.summarize([0.25])
    assert one == {"median": 0.25, "ci_low": None, "ci_high": None, "p90": None, "p99": None,
                   "mean": 0.25, "std": 0.0, "min": 0.25, "max": 0.25, "n": 1}
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_ratio_spread_pairs_by_index_and_skips_zero_denominators():
    r = stats.ratio_spread([2.0, 3.0, 5.0, 9.0], [1.0, 2.0, 0.0, 3.0])
    # pairs: 2/1, 3/2, (5/0 skipped), 9/3
    assert r["n"] == 3
    assert r["median"] == pytest.approx(2.0)
    assert r["min"] == pytest.approx(1.5)
    assert r["max"] == pytest.approx(3.0)
    assert stats.ratio_spread([1.0], [0.0])["n"] == 0


# --------------------------------------------------------------------------- harness

def test_repeat_policy_bounds_per_variant():
    p = harness.RepeatPolicy(warmup=0, min_iterations=3, min_seconds=1.0, max_iterations=5)
    assert not p.done({"a": 0, "b": 0}, {"a": 0.0, "b": 0.0}, 0)
    assert not p.done({"a": 2, "b": 2}, {"a": 100.0, "b": 100.0}, 2)  # time alone: no
    assert not p.done({"a": 3, "b": 3}, {"a": 0.5, "b": 0.5}, 3)      # count alone: no
    # min_seconds is per variant: one variant's time does not count for the other
    assert not p.done({"a": 3, "b": 3}, {"a": 5.0, "b": 0.6}, 3)
    assert p.done({"a": 3, "b": 3}, {"a": 1.0, "b": 1.0}, 3)
    # excluded (compiling) samples do not count: clean counts are what is passed
    assert not p.done({"a": 2, "b": 3}, {"a": 1.0, "b": 1.0}, 4)
    assert p.done({"a": 0, "b": 0}, {"a": 0.0, "b": 0.0}, 5)  # the maximum stops it
    with pytest.raises(ValueError, match="max_iterations=2 is below min_iterations=5"):
        harness.RepeatPolicy(min_iterations=5, max_iterations=2)


def _sample(variant, batch, it, e2e, ttft, tpot, prompt=16, out=8, excluded=None):
    return {"variant": variant, "batch": batch, "iteration": it, "e2e_s": e2e, "ttft_s": ttft,
            "ttft_engine_s": ttft, "tpot_s": tpot, "prompt_tokens": prompt,
            "output_tokens": out, "e2e_tok_s": out / e2e, "decode_tok_s": batch / tpot,
            "prefill_tok_s": prompt / ttft, "compile_events": 1 if excluded else 0,
            "excluded": excluded}


def test_summarize_runs_groups_by_variant_and_batch():
    samples = [_sample("lora-base", 1, i, 1.0 + i, 0.1, 0.01 * (i + 1)) for i in range(3)]
    samples += [_sample("lora-adapter", 1, i, 2.0, 0.2, 0.02) for i in range(3)]
    samples += [_sample("lora-base", 2, i, 4.0, 0.4, 0.04, prompt=32, out=16) for i in range(2)]
    runs = {(r["variant"], r["batch"]): r for r in harness.summarize_runs(samples)}
    assert set(runs) == {("lora-base", 1), ("lora-adapter", 1), ("lora-base", 2)}
    base1 = runs[("lora-base", 1)]
    assert base1["status"] == "ok"
    assert base1["prompt_tokens"] == 16 and base1["output_tokens"] == 8
    for key in harness.METRIC_KEYS:
        assert set(base1[key]) >= {"median", "ci_low", "ci_high", "p90", "p99", "std", "n"}
        assert base1[key]["n"] == 3
    assert base1["e2e_s"]["median"] == 2.0
    assert base1["tpot_s"]["max"] == pytest.approx(0.03)
    assert runs[("lora-base", 2)]["output_tokens"] == 16
    assert runs[("lora-base", 2)]["ttft_s"]["n"] == 2


def test_compiling_samples_are_excluded_from_the_statistics_and_the_pairs():
    samples = [_sample("lora-base", 1, i, 1.0, 0.1, 0.01) for i in range(4)]
    samples += [_sample("lora-adapter", 1, i, 1.0, 0.1, 0.012) for i in range(4)]
    # iteration 0 of the adapter still compiled a kernel: 10x slower
    samples[4] = _sample("lora-adapter", 1, 0, 10.0, 5.0, 0.12, excluded="compiled")
    runs = {(r["variant"], r["batch"]): r for r in harness.summarize_runs(samples)}
    adapter = runs[("lora-adapter", 1)]
    assert adapter["iterations"] == 4 and adapter["excluded_compile"] == 1
    assert adapter["tpot_s"]["n"] == 3 and adapter["tpot_s"]["max"] == pytest.approx(0.012)
    (row,) = harness.paired_overhead(samples, "lora-adapter", "lora-base")
    assert row["tpot_ratio"]["n"] == 3 and row["tpot_ratio"]["max"] == pytest.approx(1.2)


def test_paired_overhead_pairs_by_iteration():
    samples = []
    for i in range(4):
        samples.append(_sample("lora-base", 1, i, 1.0, 0.1, 0.010))
        samples.append(_sample("lora-adapter", 1, i, 1.2, 0.1, 0.010 * (1.1 + 0.1 * i)))
    # batch 4: the numerator misses iteration 1, which must not be paired with anything
    for i in range(3):
        samples.append(_sample("lora-base", 4, i, 2.0, 0.2, 0.02))
        if i != 1:
            samples.append(_sample("lora-adapter", 4, i, 3.0, 0.4, 0.03))
    # a variant with no partner at batch 8 produces no row
    samples.append(_sample("lora-base", 8, 0, 2.0, 0.2, 0.02))
    rows = harness.paired_overhead(samples, "lora-adapter", "lora-base")
    assert [r["batch"] for r in rows] == [1, 4]
    b1, b4 = rows
    assert b1["numerator"] == "lora-adapter" and b1["denominator"] == "lora-base"
    assert b1["tpot_ratio"]["n"] == 4
    assert b1["tpot_ratio"]["min"] == pytest.approx(1.1)
    assert b1["tpot_ratio"]["max"] == pytest.approx(1.4)
    assert b1["tpot_ratio"]["median"] == pytest.approx(1.25)
    assert b1["e2e_ratio"]["median"] == pytest.approx(1.2)
    assert b1["ttft_ratio"]["median"] == pytest.approx(1.0)
    assert b4["tpot_ratio"]["n"] == 2
    assert b4["tpot_ratio"]["median"] == pytest.approx(1.5)
    assert b4["e2e_ratio"]["median"] == pytest.approx(1.5)
    assert b4["ttft_ratio"]["median"] == pytest.approx(2.0)


class FakeEngine:
    """Records every generate() call; answers with a BatchTiming whose e2e follows `e2e` (a list
    consumed call by call, then 0.5) and whose compile counter grows on the calls in `compiles`.
    It stands in for an engine only to test the harness's bookkeeping."""

    def __init__(self, e2e=(), compiles=()):
        self.calls = []
        self.e2e = list(e2e)
        self.compiles = set(compiles)
        self.compiled = 0

    def compile_events(self):
        return self.compiled

    def generate(self, prompts, new_tokens, adapters):
        self.calls.append((len(prompts), new_tokens, list(adapters)))
        if len(self.calls) in self.compiles:
            self.compiled += 1
        tag = 1 if adapters[0] else 0
        n = len(prompts)
        e2e = self.e2e.pop(0) if self.e2e else 0.5
        return BatchTiming(e2e_s=e2e, ttft_s=[0.1] * n, tpot_s=[0.05] * n,
                           prompt_tokens=n * len(prompts[0]), output_tokens=n * new_tokens,
                           output_token_ids=[[tag, len(self.calls)]] * n,
                           ttft_engine_s=[0.08] * n)


@pytest.mark.parametrize("warmup", [1, 3])
def test_measure_batch_warms_up_interleaves_and_slices(warmup):
    eng = FakeEngine()
    prompts = [[0, 1, 2, 3]] * 4
    variants = {"lora-base": [None] * 4, "lora-adapter": ["a"] * 4}
    policy = harness.RepeatPolicy(warmup=warmup, min_iterations=3, min_seconds=0,
                                  max_iterations=10)
    samples, outputs, warm = harness.measure_batch(eng, prompts, 8, variants, policy, batch=2)
    # a steady engine: `warmup` calls per variant (at least two, to see two agree)
    calls = max(warmup, 2)
    assert [c[2][0] for c in eng.calls[:2 * calls]] == [None] * calls + ["a"] * calls
    assert warm["lora-base"]["steady"] and warm["lora-base"]["calls"] == calls
    timed = eng.calls[2 * calls:]
    assert len(timed) == 6 and len(samples) == 6
    # every call sees exactly `batch` prompts and adapters
    assert all(c[0] == 2 and len(c[2]) == 2 and c[1] == 8 for c in eng.calls)
    # the order rotates every iteration so neither variant always runs first
    assert [s["variant"] for s in samples] == ["lora-base", "lora-adapter",
                                               "lora-adapter", "lora-base",
                                               "lora-base", "lora-adapter"]
    assert [s["iteration"] for s in samples] == [0, 0, 1, 1, 2, 2]
    s = samples[0]
    assert s["batch"] == 2 and s["e2e_s"] == 0.5 and s["ttft_s"] == 0.1 and s["tpot_s"] == 0.05
    assert s["ttft_engine_s"] == 0.08 and s["excluded"] is None
    assert s["output_tokens"] == 16 and s["e2e_tok_s"] == pytest.approx(32.0)
    assert s["decode_tok_s"] == pytest.approx(2 / 0.05)
    assert s["prefill_tok_s"] == pytest.approx(8 / 0.1)
    # outputs: the first request of the first warm-up call
    assert outputs == {"lora-base": [0, 1], "lora-adapter": [1, calls + 1]}


def test_warm_up_continues_while_compiling_or_unsettled():
    # calls 1-3 compile (e.g. Triton JIT at a new batch size), call 4 is slower than call 5
    eng = FakeEngine(e2e=[3.0, 2.0, 1.0, 0.8, 0.5, 0.5], compiles={1, 2, 3})
    policy = harness.RepeatPolicy(warmup=1, min_iterations=1, min_seconds=0, max_iterations=1)
    warm = harness.warm_up(eng, [[0, 1]], 2, [None], policy)
    assert warm["steady"] and warm["calls"] == 6 and warm["compile_events"] == 3
    never = harness.warm_up(FakeEngine(e2e=[1.0, 2.0] * 10), [[0, 1]], 2, [None], policy)
    assert not never["steady"] and never["calls"] == policy.max_warmup


def test_a_timed_call_that_compiles_is_flagged_and_replaced():
    eng = FakeEngine(compiles={5})  # two steady warm-ups per variant, then the 1st timed call
    policy = harness.RepeatPolicy(warmup=1, min_iterations=2, min_seconds=0, max_iterations=10)
    samples, _, _ = harness.measure_batch(eng, [[0, 1]], 2, {"a": [None], "b": ["x"]}, policy, 1)
    flagged = [s for s in samples if s["excluded"]]
    assert len(flagged) == 1 and flagged[0]["compile_events"] == 1
    # the excluded sample does not count: each variant still has two clean ones
    clean = [s for s in samples if not s["excluded"]]
    assert {v: sum(s["variant"] == v for s in clean) for v in ("a", "b")} == {"a": 2, "b": 3}


def test_measure_batch_stops_at_max_iterations():
    eng = FakeEngine()
    policy = harness.RepeatPolicy(warmup=0, min_iterations=1, min_seconds=3600,
                                  max_iterations=2)
    samples, _, _ = harness.measure_batch(eng, [[0, 1]], 2, {"base": [None]}, policy, batch=1)
    assert len(samples) == 2


def test_lora_xn_runs_only_where_the_batch_holds_n_requests():
    variants = harness.variants_for(["a0", "a1", "a2", "a3"], [4], 8)
    assert variants["lora-x4"] == ["a0", "a1", "a2", "a3"] * 2
    small, skipped = harness.variants_at(variants, 1)
    assert set(small) == {"lora-base", "lora-adapter"}
    assert skipped == [{"variant": "lora-x4", "batch": 1, "status": "not run",
                        "reason": "lora-x4 needs a batch of at least 4 requests"}]
    big, none = harness.variants_at(variants, 4)
    assert "lora-x4" in big and none == []


# --------------------------------------------------------------------------- workload

def test_fixed_length_prompts_exact_lengths_with_byte_tokenizer():
    from int4lora.models import byte_tokenizer
    from int4lora.workload import fixed_length_prompts, load_prompts
    tok = byte_tokenizer()
    texts = ["hello world", "ab"]
    for length in (2, 5, 16, 100):
        prompts = fixed_length_prompts(tok, texts, 5, length)
        assert len(prompts) == 5
        assert all(len(p) == length for p in prompts)
        assert all(p[0] == tok.bos_token_id for p in prompts)
    prompts = fixed_length_prompts(tok, texts, 3, 12)
    assert prompts[0] == prompts[2]          # cycles through the prompt set
    assert prompts[1][1:] == ([67, 68] * 6)[:11]  # "ab", repeated to fill the length
    assert prompts[0][1:6] == tok("hello", add_special_tokens=False)["input_ids"]
    shipped = fixed_length_prompts(tok, load_prompts(), 4, 32)
    assert all(len(p) == 32 for p in shipped)
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        fixed_length_prompts(tok, [""], 1, 8)


# --------------------------------------------------------------------------- coverage

@pytest.mark.parametrize("name,family", [
    ("model.layers.0.block_sparse_moe.experts.3.w1.weight_packed", "experts"),
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight_scale", "experts"),
    ("model.layers.1.mlp.experts.gate_up_proj", "experts"),
    ("model.layers.1.mlp.experts.down_proj", "experts"),
    ("model.layers.0.block_sparse_moe.gate.weight", "router"),
    ("model.layers.0.mlp.gate.weight", "router"),
    ("model.layers.0.self_attn.q_proj.weight_packed", "attention"),
    ("model.layers.0.self_attn.o_proj.weight", "attention"),
    ("model.layers.0.mlp.gate_proj.weight", "dense_mlp"),
    ("model.layers.0.mlp.down_proj.weight_packed", "dense_mlp"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "lora"),
    ("model.embed_tokens.weight", "embeddings"),
    ("lm_head.weight", "lm_head"),
    ("model.norm.weight", "norm"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("model.rotary_emb.inv_freq", "other"),
])
def test_family_of(name, family):
    assert coverage.family_of(name) == family


def test_family_of_post_attention_layernorm_is_norm():
    assert coverage.family_of("model.layers.0.post_attention_layernorm.weight") == "norm"
    assert coverage.family_of("model.layers.0.input_layernorm.weight") == "norm"
    assert coverage.family_of("model.norm.weight") == "norm"


def _storage(**bytes_by_family):
    fams = {f: {"bytes": 0, "elements": 0, "elements_4bit": 0, "bytes_4bit": 0}
            for f in coverage.FAMILIES}
    for f, b in bytes_by_family.items():
        fams[f]["bytes"] = b
    return {"families": fams}


def test_decode_weight_bytes_scales_moe_experts_by_expected_share():
    storage = _storage(attention=100, dense_mlp=0, experts=1000, router=4, embeddings=50,
                       lm_head=30, norm=6, lora=7)
    moe = {"num_local_experts": 8, "num_experts_per_tok": 2}
    dense = 100 + 4 + 30 + 6  # everything but experts, embeddings (rows only) and lora
    assert coverage.decode_weight_bytes(storage, moe, 1) == dense + 250           # 2 of 8
    assert coverage.decode_weight_bytes(storage, moe, 2) == int(dense + 1000 * (1 - 0.75 ** 2))
    big = coverage.decode_weight_bytes(storage, moe, 64)
    assert dense + 999 <= big <= dense + 1000                                     # ~all experts
    # monotone in batch
    got = [coverage.decode_weight_bytes(storage, moe, b) for b in (1, 2, 4, 8, 16)]
    assert got == sorted(got)
    # without MoE keys the expert bytes count whole
    assert coverage.decode_weight_bytes(storage, {}, 1) == dense + 1000
    # tied embeddings: the head reads the whole table
    tied = coverage.decode_weight_bytes(storage, {**moe, "tie_word_embeddings": True}, 1)
    assert tied == dense + 250 + 50
    no_head = _storage(attention=100, embeddings=50)
    assert coverage.decode_weight_bytes(no_head, {}, 1) == 150


def test_checkpoint_storage_counts_packed_int4(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    save_file({
        "model.layers.0.self_attn.q_proj.weight_packed": torch.zeros(64, 8, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.weight_scale": torch.zeros(64, 1, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight_shape": torch.tensor([64, 64]),
        "model.layers.0.block_sparse_moe.experts.0.w1.weight_packed":
            torch.zeros(32, 8, dtype=torch.int32),
        "model.layers.0.block_sparse_moe.gate.weight": torch.zeros(4, 64, dtype=torch.bfloat16),
        "model.embed_tokens.weight": torch.zeros(10, 64, dtype=torch.bfloat16),
    }, str(tmp_path / "model.safetensors"))
    s = coverage.checkpoint_storage(tmp_path)
    att, exp, router = (s["families"][f] for f in ("attention", "experts", "router"))
    assert att["elements"] == att["elements_4bit"] == 64 * 64 and att["share_4bit"] == 1.0
    assert att["bytes"] == 64 * 8 * 4 + 64 * 2 + 2 * 8
    assert exp["elements_4bit"] == 32 * 64 and exp["share_4bit"] == 1.0
    assert router["share_4bit"] == 0.0 and router["bytes"] == 4 * 64 * 2
    assert s["bytes_by_dtype"]["int4 (packed)"] == (64 * 8 + 32 * 8) * 4
    assert s["bytes_by_dtype"]["scales"] == 64 * 2
    assert s["total_bytes"] == sum(f["bytes"] for f in s["families"].values())


# --------------------------------------------------------------------------- memory

def test_kv_cache_bytes():
    arch = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_size": 128}
    # 2 (K and V) x layers x kv heads x head_dim x tokens x batch x bytes
    assert memory.kv_cache_bytes(arch, batch=3, tokens=10) == 2 * 2 * 2 * 32 * 10 * 3 * 2
    assert memory.kv_cache_bytes(arch, 3, 10, bytes_per_element=4) == 2 * 2 * 2 * 32 * 10 * 3 * 4
    mha = {k: v for k, v in arch.items() if k != "num_key_value_heads"}
    assert memory.kv_cache_bytes(mha, 1, 1) == 2 * 2 * 4 * 32 * 2
    explicit = {**arch, "head_dim": 64}
    assert memory.kv_cache_bytes(explicit, 1, 1) == 2 * 2 * 2 * 64 * 2
    assert memory.kv_cache_bytes(arch, 0, 10) == 0


def test_attribute_splits_peak_into_components():
    parts = memory.attribute(1000, 100, 500, 50, 150)
    assert parts == {"runtime_before_load": 100, "weights": 500, "adapter": 50,
                     "kv_cache": 150, "activations_and_other": 200}
    assert memory.attribute(10, 100, 500, 50, 150)["activations_and_other"] == 0
    assert "activations_and_other" not in memory.attribute(None, 0, 1, 2, 3)


# --------------------------------------------------------------------------- resultio

def _ok_result():
    r = resultio.new_result("adapter", "m", adapter="a", params={"x": 1})
    r["metrics"] = {"rank": 16}
    return r


def test_write_result_validates_and_writes(tmp_path, result_validator):
    out = tmp_path / "sub" / "r.json"
    resultio.write_result(out, _ok_result(), config={"k": 1})
    data = json.loads(out.read_text())
    result_validator.validate(data)
    assert data["schema"] == "bench/v2" and data["status"] == "ok"
    assert oct(out.stat().st_mode & 0o777) == "0o644"  # readable by the team, as plain files
    for key in ("device", "torch", "transformers", "git_commit", "config_hash", "hostname",
                "started", "finished"):
        assert key in data["env"]
    assert data["env"]["config_hash"] == resultio.config_hash({"k": 1})
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]  # no temp file left


@pytest.mark.parametrize("breakage", ["status", "ok_with_reason", "failure_without_reason",
                                      "bench_without_samples", "extra_key", "validate_bad"])
def test_invalid_result_raises_and_leaves_no_file(tmp_path, breakage):
    import jsonschema
    r = _ok_result()
    if breakage == "status":
        r["status"] = "maybe"
    elif breakage == "ok_with_reason":
        r["reason"] = "should be null when ok"
    elif breakage == "failure_without_reason":
        r["status"] = "unsupported"
    elif breakage == "bench_without_samples":
        r["kind"] = "bench"
        r["metrics"] = {"runs": [], "overhead": [], "outputs": {}, "engine_info": {}}
    elif breakage == "extra_key":
        r["extra"] = 1
    elif breakage == "validate_bad":
        r["kind"] = "validate"
        r["metrics"] = {"verdict": "MAYBE", "checks": []}
    out = tmp_path / "r.json"
    with pytest.raises(jsonschema.ValidationError):
        resultio.write_result(out, r)
    assert list(tmp_path.iterdir()) == []


def test_failed_serialization_keeps_previous_file_and_no_temp(tmp_path):
    out = tmp_path / "r.json"
    resultio.write_result(out, _ok_result())
    before = out.read_text()
    bad = _ok_result()
    bad["metrics"] = {"not_json": object()}
    with pytest.raises(TypeError):
        resultio.write_result(out, bad)
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_recorded_failures(monkeypatch):
    r = resultio.new_result("bench", "m", "e")
    with resultio.recorded_failures(r):
        raise resultio.ExpectedFailure("unsupported", "no GPU here")
    assert (r["status"], r["reason"]) == ("unsupported", "no GPU here")

    class OutOfMemoryError(RuntimeError):
        pass
    r = resultio.new_result("bench", "m", "e")
    with resultio.recorded_failures(r):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore text")
    assert r["status"] == "oom"
    assert r["reason"].endswith("Tried to allocate 2 GiB")

    r = resultio.new_result("bench", "m", "e")
    with pytest.raises(KeyError):
        with resultio.recorded_failures(r):
            raise KeyError("boom")
    assert r["status"] == "ok"

    monkeypatch.setattr(resultio, "RECORD_ERRORS", True)
    with resultio.recorded_failures(r):
        raise KeyError("boom")
    assert r["status"] == "error" and "KeyError" in r["reason"]


def test_require_ok_propagates_upstream_failure(tmp_path):
    from int4lora.upstream import require_ok
    ok = tmp_path / "ok.json"
    bad = tmp_path / "bad.json"
    resultio.write_result(ok, _ok_result())
    failed = _ok_result()
    failed.update(status="unsupported", reason="group size")
    resultio.write_result(bad, failed)
    assert set(require_ok(fetch=str(ok), adapter=None)) == {"fetch"}
    with pytest.raises(resultio.ExpectedFailure) as exc:
        require_ok(fetch=str(ok), quantize=str(bad))
    assert exc.value.status == "unsupported" and "quantize step: group size" in exc.value.reason


def test_require_ok_names_a_damaged_or_missing_tuned_kernel_config(tmp_path):
    from int4lora.upstream import require_ok
    configs = [tmp_path / "NVIDIA_H200_SHRINK.json", tmp_path / "NVIDIA_H200_EXPAND_TRUE.json"]
    for path in configs:
        path.write_text('{"1": {"3": {}}}')
    tuning = _ok_result()
    tuning.update(kind="tuning", adapter=None)
    tuning["metrics"] = {"files": [str(p) for p in configs], "config_folder": str(tmp_path),
                         "gpu": "NVIDIA H200", "keys": []}
    result = tmp_path / "tuning.json"
    resultio.write_result(result, tuning)
    assert set(require_ok(tuning=str(result))) == {"tuning"}
    configs[1].write_text('{"1": {"3"')  # truncated
    with pytest.raises(resultio.ExpectedFailure) as exc:
        require_ok(tuning=str(result))
    assert f"tuned LoRA kernel config {configs[1]} is not JSON" in exc.value.reason
    assert f"delete {result} and rerun" in exc.value.reason
    configs[1].unlink()
    with pytest.raises(resultio.ExpectedFailure, match="EXPAND_TRUE.json is missing"):
        require_ok(tuning=str(result))


# --------------------------------------------------------------------------- quantize helpers

def test_indivisible_layers_names_the_layers():
    torch = pytest.importorskip("torch")
    import quantize

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(128, 64)     # 128 % 64 == 0
            self.down_proj = torch.nn.Linear(96, 64)   # 96 % 64 != 0
            self.lm_head = torch.nn.Linear(96, 10)     # ignored by name

    bad = quantize.indivisible_layers(Tiny(), 64)
    assert bad == ["down_proj (in_features=96)"]
    assert quantize.indivisible_layers(Tiny(), 32) == []
    assert quantize.indivisible_layers(Tiny(), 64, ignore_names=()) == [
        "down_proj (in_features=96)", "lm_head (in_features=96)"]


def test_rename_experts_for_vllm(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import save_file
    import quantize

    tensors = {
        "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight_packed": torch.full((2, 2), 1),
        "model.layers.0.block_sparse_moe.experts.0.down_proj.weight_packed": torch.full((2, 2), 2),
        "model.layers.0.block_sparse_moe.experts.11.up_proj.weight_scale": torch.full((2,), 3.0),
        "model.layers.0.block_sparse_moe.gate.weight": torch.full((2, 2), 4.0),
        "model.layers.0.mlp.gate_proj.weight_packed": torch.full((2, 2), 5),  # dense: unchanged
        "model.layers.0.self_attn.q_proj.weight_packed": torch.full((2, 2), 6),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in tensors}}))
    assert quantize.rename_experts_for_vllm(tmp_path) == 3
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata() == {"format": "pt"}
        w1 = fh.get_tensor("model.layers.0.block_sparse_moe.experts.0.w1.weight_packed")
        w3 = fh.get_tensor("model.layers.0.block_sparse_moe.experts.11.w3.weight_scale")
    assert keys == {
        "model.layers.0.block_sparse_moe.experts.0.w1.weight_packed",
        "model.layers.0.block_sparse_moe.experts.0.w2.weight_packed",
        "model.layers.0.block_sparse_moe.experts.11.w3.weight_scale",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.mlp.gate_proj.weight_packed",
        "model.layers.0.self_attn.q_proj.weight_packed",
    }
    assert torch.equal(w1, torch.full((2, 2), 1)) and torch.equal(w3, torch.full((2,), 3.0))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == keys
    # idempotent: a second pass finds nothing to rename
    assert quantize.rename_experts_for_vllm(tmp_path) == 0


# --------------------------------------------------------------------------- decode profile table

def _stats(median):
    return {"median": median, "ci_low": None, "ci_high": None, "p90": None, "p99": None,
            "min": median, "max": median, "std": 0.0, "n": 3}


def _bench_result(model, engine, adapter, tpot_s, decode_profile=None):
    """A bench result as bench.py writes it, batch 1 only; decode_profile as given."""
    variant = "lora-adapter" if adapter != "none" else "base"
    runs = [{"variant": v, "batch": 1, "status": "ok", "prompt_tokens": 16, "output_tokens": 8,
             "iterations": 3, "excluded_compile": 0,
             "ttft_s": _stats(0.01), "tpot_s": _stats(t), "e2e_s": _stats(0.1),
             "e2e_tok_s": _stats(80.0), "decode_tok_s": _stats(1 / t),
             "prefill_tok_s": _stats(1600.0)}
            for v, t in ([("lora-base", tpot_s / 2)] if adapter != "none" else [])
            + [(variant, tpot_s)]]
    res = resultio.new_result("bench", model, engine, adapter,
                              params={"mode": "lora" if adapter != "none" else "baseline"})
    res["metrics"] = {"runs": runs, "overhead": [], "outputs": {}, "engine_info": {},
                      "warmup": {},
                      "memory": {"peak_rss_bytes": 1 << 20}, "adapter_bytes": 0,
                      "weight_storage": None,
                      "architecture": {"num_hidden_layers": 2, "num_attention_heads": 4,
                                       "hidden_size": 128}}
    if decode_profile is not None:
        res["metrics"]["decode_profile"] = decode_profile
    res["samples"] = [{"variant": r["variant"], "batch": 1, "iteration": 0, "e2e_s": 0.1,
                       "ttft_s": 0.01, "tpot_s": 0.01, "prompt_tokens": 16, "output_tokens": 8,
                       "compile_events": 0, "excluded": None} for r in runs]
    res["env"] = resultio.capture_env()
    return res


def pd_isna(v):
    pd = pytest.importorskip("pandas")
    return pd.isna(v)


def _classes(**us):
    from int4lora.profiling import CLASS_NAMES
    total = sum(us.values())
    return {c: {"total_us": us.get(c, 0.0), "calls": 1 if us.get(c) else 0,
                "share": us.get(c, 0.0) / total if total else 0.0} for c in CLASS_NAMES}


PER_STEP_PROFILE = {  # vLLM: decode steps annotated; bench.py added the sweep comparison
    "adapter": "r16-qv-0",
    "by_step_kind": {
        "prefill": {"count": 1, "gpu_us_per_step_median": 900.0, "gpu_period_us_median": None,
                    "by_class": _classes(w4a16_gemm=900.0), "kernels": []},
        "decode": {"count": 63, "gpu_us_per_step_median": 1500.0,
                   "gpu_period_us_median": 2000.0, "gpu_span_us_per_step_median": 1800.0,
                   "by_class": _classes(w4a16_gemm=60.0, lora=20.0, attention=15.0,
                                        memcpy=5.0),
                   "kernels": [{"name": "void machete::MacheteKernelTemplate<128>(Params)",
                                "class": "w4a16_gemm", "total_us": 60.0, "calls": 63,
                                "mean_us": 0.95, "share": 0.6}]}},
    # whole trace deliberately different, so a row using it would show it
    "by_class": _classes(w4a16_gemm=50.0, other=50.0),
    "kernels": [{"name": "whole_trace_top", "class": "other", "total_us": 50.0, "calls": 1,
                 "mean_us": 50.0, "share": 0.5}],
    "total_gpu_us": 1e5, "gpu_span_us": 2e5, "decode_step_us": 1587.3, "tpot_s_median": 0.004,
    "unattributed_us": 10.0, "decode_gpu_busy_fraction": 0.75,
    "sweep_tpot_s_batch1": 0.003, "kernel_fraction_of_tpot": 0.5,
}
WHOLE_TRACE_PROFILE = {  # no step annotations: bench.py stores no sweep comparison
    "adapter": None, "by_step_kind": {},
    "by_class": _classes(gemm_other=30.0, norm_act=10.0),
    "kernels": [{"name": "nvjet_hsh_128x64", "class": "gemm_other", "total_us": 30.0,
                 "calls": 7, "mean_us": 4.3, "share": 0.75}],
    "total_gpu_us": 8000.0, "gpu_span_us": 9000.0, "decode_step_us": 250.0,
    "tpot_s_median": 0.002, "unattributed_us": None, "decode_gpu_busy_fraction": None,
}


@pytest.fixture
def decode_tables(tmp_path):
    import aggregate
    results = {"a/vllm/r16-qv": _bench_result("a", "vllm", "r16-qv", 0.003, PER_STEP_PROFILE),
               "a/hf/baseline": _bench_result("a", "hf", "none", 0.001, WHOLE_TRACE_PROFILE),
               "b/hf/baseline": _bench_result("b", "hf", "none", 0.001)}
    inputs = []
    for name, res in results.items():
        path = tmp_path / "bench" / f"{name}.json"
        resultio.write_json_atomic(path, res)
        inputs.append(str(path))
    return aggregate.main(inputs, str(tmp_path / "tables")), tmp_path / "tables"


def test_decode_profile_table_rows(decode_tables):
    frames, tables = decode_tables
    df = frames["decode_profile"]
    assert (tables / "decode_profile.csv").exists()
    assert len(df) == 2 and set(df["model"]) == {"a"}  # b has no decode_profile
    per_step = df[df["engine"] == "vllm"].iloc[0]
    assert per_step["adapter"] == "r16-qv" and per_step["profiled_request"] == "r16-qv-0"
    assert per_step["attribution"] == "per-step" and per_step["decode_steps"] == 63
    assert per_step["kernel_us_per_step"] == 1500.0 and per_step["step_period_us"] == 2000.0
    assert per_step["sweep_tpot_ms_batch1"] == pytest.approx(3.0)
    assert per_step["kernel_fraction_of_tpot"] == 0.5
    assert per_step["host_gap_fraction"] == pytest.approx(0.5)
    # shares of the decode steps' kernel time, not of the whole trace
    assert per_step["share_w4a16_gemm"] == pytest.approx(0.6)
    assert per_step["share_lora"] == pytest.approx(0.2)
    assert per_step["share_attention"] == pytest.approx(0.15)
    assert per_step["share_memcpy"] == pytest.approx(0.05)
    assert per_step["share_other"] == 0.0 and per_step["share_moe"] == 0.0
    assert per_step["top_kernel"].startswith("void machete::")
    assert per_step["top_kernel_share"] == pytest.approx(0.6)

    whole = df[df["engine"] == "hf"].iloc[0]
    assert whole["adapter"] == "none" and whole["profiled_request"] == "base"
    assert whole["attribution"] == "whole trace"
    assert whole["kernel_us_per_step"] == 250.0 and pd_isna(whole["step_period_us"])
    # TPOT from the result's own batch-1 base run: 250 µs of 1 ms
    assert whole["sweep_tpot_ms_batch1"] == pytest.approx(1.0)
    assert whole["kernel_fraction_of_tpot"] == pytest.approx(0.25)
    assert whole["host_gap_fraction"] == pytest.approx(0.75)
    assert whole["share_gemm_other"] == pytest.approx(0.75)
    assert whole["share_norm_act"] == pytest.approx(0.25)
    assert whole["top_kernel"] == "nvjet_hsh_128x64"


def test_decode_profile_row_without_kernels_has_no_shares():
    """On the CPU the HF profile has decode steps but no kernels: no shares, no fraction."""
    import aggregate
    prof = {"adapter": None, "by_class": _classes(), "kernels": [], "total_gpu_us": 0.0,
            "decode_step_us": 0.0,
            "by_step_kind": {"decode": {"count": 5, "gpu_us_per_step_median": None,
                                        "gpu_period_us_median": None, "by_class": _classes(),
                                        "kernels": []}}}
    (row,) = aggregate.decode_profile_rows(_bench_result("m", "hf", "none", 0.01, prof))
    assert row["attribution"] == "per-step" and row["decode_steps"] == 5
    assert row["kernel_us_per_step"] is None and row["kernel_fraction_of_tpot"] is None
    assert row["host_gap_fraction"] is None and row["top_kernel"] is None
    assert all(row[f"share_{c}"] is None for c in ("w4a16_gemm", "lora", "other", "memcpy"))
    assert row["sweep_tpot_ms_batch1"] == pytest.approx(10.0)


def _report(tables, tmp_path):
    import report
    figures = tmp_path / "figures"
    figures.mkdir(exist_ok=True)
    return report.build_markdown(tables, figures, "pytest", "", [], {}, {})


def test_report_renders_decode_section(decode_tables, tmp_path):
    _, tables = decode_tables
    text = _report(tables, tmp_path)
    assert "## Where batch-1 decode time goes" in text
    # after the latency and overhead sections, before memory
    assert text.index("## LoRA overhead") < text.index("## Where batch-1") < text.index(
        "## Memory")
    section = text.split("## Where batch-1 decode time goes")[1].split("\n## ")[0]
    section = re.sub(r'<a id="[^"]*"></a>', "", section)  # the rows' anchors
    rows = [line for line in section.splitlines() if line.startswith("| a |")]
    assert len(rows) == 2
    vllm = next(r for r in rows if "| vllm |" in r)
    cells = [c.strip() for c in vllm.strip("|").split("|")]
    header = [c.strip() for c in section.splitlines()[
        next(i for i, line in enumerate(section.splitlines()) if line.startswith("| model"))
    ].strip("|").split("|")]
    got = dict(zip(header, cells))
    assert got["request"] == "r16-qv-0" and got["attribution"] == "per-step"
    assert got["kernel µs/step"] == "1,500.0" and got["step period µs"] == "2,000.0"
    assert got["TPOT ms (b=1)"] == "3.00"
    assert got["kernel/TPOT"] == "50.0%" and got["host gap"] == "50.0%"
    # the classes that hold time, largest first; classes with no time are left out
    assert got["kernel time by class"] == "w4a16_gemm 60% · lora 20% · attention 15% · memcpy 5%"
    assert got["top kernel"].startswith("`void machete::") and got["top share"] == "60.0%"
    whole = dict(zip(header, [c.strip() for c in next(
        r for r in rows if "| hf |" in r).strip("|").split("|")]))
    assert whole["attribution"] == "whole trace" and whole["step period µs"] == "–"
    assert whole["host gap"] == "75.0%"
    assert "](../figures/decode_time.png)" in section


def test_decode_time_figure(decode_tables, tmp_path):
    import plots
    _, tables = decode_tables
    profile = plots.read_table(tables, "decode_profile")
    seg = plots.decode_segments(profile)
    vllm = seg.loc["a vllm r16-qv-0"]
    assert vllm["w4a16_gemm"] == pytest.approx(900.0) and vllm["lora"] == pytest.approx(300.0)
    assert vllm["host gap"] == pytest.approx(1500.0)  # 3 ms TPOT - 1.5 ms of kernels
    assert vllm.sum() == pytest.approx(3000.0)
    whole = seg.loc["a hf base (whole trace)"]
    assert whole["gemm_other"] == pytest.approx(187.5) and whole["host gap"] == pytest.approx(750)
    assert "moe" not in seg.columns and list(seg.columns)[-1] == "host gap"
    assert plots.decode_segments(profile.iloc[:0]).empty
    for name, rows in (("rows", profile), ("empty", profile.iloc[:0])):
        out = tmp_path / f"{name}.png"
        plots.decode_time(rows, out)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_omits_decode_section_without_rows(tmp_path):
    import aggregate
    path = tmp_path / "bench" / "b.json"
    resultio.write_json_atomic(path, _bench_result("b", "hf", "none", 0.001))
    frames = aggregate.main([str(path)], str(tmp_path / "tables"))
    assert frames["decode_profile"].empty and len(frames["bench"]) == 1
    text = _report(tmp_path / "tables", tmp_path)
    assert "## Latency and throughput" in text
    assert "Where batch-1 decode time goes" not in text and "host gap" not in text
    assert "decode_time.png" not in text


def test_drop_stale_cache_results(tmp_path):
    """Results restored from another GPU lease: a model result whose weight cache is gone is
    removed (so Snakemake rebuilds it), one whose cache exists stays, and so do ok results."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    live = tmp_path / "cache" / "live"
    live.mkdir(parents=True)
    files = {
        "results/models/gone.json": {"status": "ok", "metrics": {"path": str(tmp_path / "nope")}},
        "results/models/live.json": {"status": "ok", "metrics": {"path": str(live)}},
        "results/adapters/m/a.json": {"status": "ok", "metrics": {
            "path": str(live), "paths": [str(live), str(tmp_path / "gone-copy")]}},
        "results/bench/m/e/baseline.json": {"status": "error", "reason":
                                            "OSError: /tmp/int4-lora-bench-cache/models/x"},
        "results/bench/m/e/r16.json": {"status": "ok", "metrics": {}},
        # the tuned Punica configs vLLM reads live in the cache too
        "results/tuning/m/e/r16.json": {"status": "ok", "metrics": {
            "config_folder": str(tmp_path / "cache" / "lora-configs" / "gone")}},
    }
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(body))
    subprocess.run([sys.executable, str(root / "tools" / "drop-stale-cache-results.py")],
                   cwd=tmp_path, check=True, capture_output=True)
    left = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json")}
    assert left == {"results/models/live.json", "results/bench/m/e/r16.json"}
