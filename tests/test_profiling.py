"""Tests of int4lora.profiling (trace summary) and of the vLLM engine's opt-in profiler wiring.

No torch, no vLLM, no GPU: traces are synthetic Kineto-style Chrome traces (categories as
torch.profiler writes them: kernel, gpu_memcpy, gpu_memset, cuda_runtime, user_annotation,
gpu_user_annotation, cpu_op, ac2g ...), step annotations as vLLM 0.26's
Worker.annotate_profile names them.
"""
from __future__ import annotations

import gzip
import json
import os
from types import SimpleNamespace

import pytest

from int4lora import profiling as pr
from conftest import install_fake_vllm
from int4lora.config import engine_config
from int4lora.engines import vllm as ve

PREFILL = "execute_context_1(16)_generation_0(0)"
DECODE = "execute_context_0(0)_generation_1(1)"

DECODE_KERNELS = [  # (name, dur)
    ("void machete::MacheteKernelTemplate<cutlass::bfloat16_t, 128>(Params)", 30.0),
    ("_lora_shrink_kernel", 5.0),
    ("_lora_expand_kernel", 5.0),
    ("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>", 8.0),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", 2.0),
    ("nvjet_hsh_128x64_64x4_2x1_v_bz_TNT", 6.0),
    ("void vllm::rotary_embedding_kernel<c10::BFloat16, true>", 4.0),
]


def _x(cat, name, ts, dur, pid=1, tid=1, **args):
    e = {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}
    if args:
        e["args"] = args
    return e


def synthetic_events(with_runtime: bool = True) -> list[dict]:
    """1 prefill step, 2 decode steps, a sampler kernel outside any step, a memcpy, a memset."""
    ev: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}},
        _x("user_annotation", PREFILL, 0.0, 100.0),
        _x("user_annotation", DECODE, 200.0, 100.0),
        _x("user_annotation", DECODE, 400.0, 100.0),
        _x("user_annotation", "some_other_range", 600.0, 10.0),
        _x("cpu_op", "aten::mm", 10.0, 5.0),
        _x("python_function", "forward", 1.0, 90.0),
        {"ph": "s", "cat": "ac2g", "name": "ac2g", "id": 10, "pid": 1, "tid": 1, "ts": 250.0},
    ]
    if with_runtime:
        ev += [
            _x("cuda_runtime", "cudaLaunchKernel", 50.0, 2.0, correlation=1),
            _x("cuda_runtime", "cudaLaunchKernel", 51.0, 2.0, correlation=2),
            _x("cuda_runtime", "cudaGraphLaunch", 250.0, 3.0, correlation=10),
            _x("cuda_runtime", "cudaGraphLaunch", 450.0, 3.0, correlation=11),
            _x("cuda_runtime", "cudaLaunchKernel", 350.0, 2.0, correlation=99),
            _x("cuda_runtime", "cudaMemcpyAsync", 360.0, 2.0, correlation=98),
            _x("cuda_driver", "cuMemsetD32Async", 370.0, 2.0, correlation=97),
        ]
    g = dict(pid=0, tid=7)
    # prefill kernels (GPU time 1000..)
    ev += [_x("kernel", DECODE_KERNELS[0][0], 1000.0, 40.0, correlation=1, **g),
           _x("kernel", DECODE_KERNELS[3][0], 1045.0, 10.0, correlation=2, **g)]
    ev.append(_x("gpu_user_annotation", PREFILL, 1000.0, 55.0, **g))
    # decode steps at GPU time 1200 and 1400 (period 200)
    for step, (start, corr) in enumerate([(1200.0, 10), (1400.0, 11)]):
        t = start
        for name, dur in DECODE_KERNELS:
            dur = dur + (2.0 if step == 1 and "machete" in name else 0.0)
            ev.append(_x("kernel", name, t, dur, correlation=corr, **g))
            t += dur + 1.0
        if step == 1:
            ev.append(_x("kernel", "void vllm::moe::moe_align_block_size_kernel", t, 2.0,
                         correlation=corr, **g))
            t += 3.0
        ev.append(_x("gpu_user_annotation", DECODE, start, t - start, **g))
    # outside any step
    ev += [_x("kernel", "void at::native::reduce_kernel<argmax>", 1600.0, 1.0, correlation=99, **g),
           _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1610.0, 3.0, correlation=98, **g),
           _x("gpu_memset", "Memset (Device)", 1620.0, 1.0, correlation=97, **g)]
    return ev


def _write(path, events, gz=False, wrap=True):
    data = {"schemaVersion": 1, "traceEvents": events} if wrap else events
    raw = json.dumps(data).encode()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return str(path)


DECODE_SUM = sum(d for _, d in DECODE_KERNELS)          # 60 per decode step
TOTAL = 50.0 + DECODE_SUM + (DECODE_SUM + 2.0 + 2.0) + 1.0 + 3.0 + 1.0   # 179


# ------------------------------------------------------------------ classify


@pytest.mark.parametrize("name,cls", [
    ("void machete::MacheteKernelTemplate<...>", "w4a16_gemm"),
    ("void marlin::Marlin<256, 1, 8, 8, 4, 8>", "w4a16_gemm"),
    ("marlin_moe_wna16::Marlin<...>", "w4a16_gemm"),
    ("gptq_gemm_kernel", "w4a16_gemm"),
    ("cutlass_w4a8_gemm", "w4a16_gemm"),
    ("_lora_shrink_kernel", "lora"), ("_lora_expand_kernel", "lora"),
    ("sgmv_expand", "lora"), ("bgmv_shrink", "lora"),
    ("void flash::flash_fwd_splitkv_kernel<...>", "attention"),
    ("fmha_cutlassF", "attention"), ("paged_attention_v2_kernel", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel", "attention"),
    ("fused_moe_kernel", "moe"), ("topkGatingSoftmax", "moe"),
    ("void vllm::rms_norm_kernel<c10::BFloat16>", "norm_act"),
    ("triton_poi_fused_mul_silu_slice_1", "norm_act"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm_act"),
    ("void vllm::act_and_mul_kernel<gelu>", "norm_act"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm_other"), ("nvjet_hsh_128x64", "gemm_other"),
    ("cublasLt::splitKreduce_kernel", "gemm_other"),
    ("void at::native::reduce_kernel<argmax>", "other"),
])
def test_classify_kernel(name, cls):
    assert pr.classify_kernel(name) == cls


def test_classify_memcpy_memset_by_category():
    assert pr.classify_kernel("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy") == "memcpy"
    assert pr.classify_kernel("Memset (Device)", "gpu_memset") == "memset"


def test_step_kind():
    assert pr.step_kind(DECODE) == "decode"
    assert pr.step_kind(PREFILL) == "prefill"
    assert pr.step_kind("execute_context_1(5)_generation_3(3)") == "mixed"
    # detailed_trace_annotation form
    assert pr.step_kind("execute_1_context_0(sq0sk0sqsq0sqsk0)_generation_1(sq1sk17sqsq1sqsk17)") \
        == "decode"
    assert pr.step_kind("execute_16_context_1(sq16sk16sqsq256sqsk256)_generation_0(sq0sk0sqsq0sqsk0)") \
        == "prefill"
    assert pr.step_kind("aten::mm") is None


# ------------------------------------------------------------------ summarize_trace


@pytest.mark.parametrize("gz", [False, True])
def test_summarize_trace_totals_classes_and_order(tmp_path, gz):
    path = _write(tmp_path / ("t.pt.trace.json" + (".gz" if gz else "")), synthetic_events(), gz=gz)
    s = pr.summarize_trace(path, top=5)
    assert s["total_gpu_us"] == pytest.approx(TOTAL)
    assert s["by_category"] == pytest.approx({"kernel": TOTAL - 4.0, "gpu_memcpy": 3.0,
                                              "gpu_memset": 1.0})
    # gpu_user_annotation / cpu / runtime / flow events are not GPU time
    assert s["gpu_events"] == 2 + 7 + 8 + 3
    # top ordering: machete 40+30+32 first, descending, at most `top`
    ks = s["kernels"]
    assert len(ks) == 5
    assert ks[0]["name"].startswith("void machete") and ks[0]["total_us"] == pytest.approx(102.0)
    assert ks[0]["calls"] == 3 and ks[0]["class"] == "w4a16_gemm"
    assert ks[0]["mean_us"] == pytest.approx(34.0)
    assert [k["total_us"] for k in ks] == sorted((k["total_us"] for k in ks), reverse=True)
    assert ks[1]["class"] == "attention" and ks[1]["total_us"] == pytest.approx(26.0)
    # classes
    bc = s["by_class"]
    assert set(bc) == set(pr.CLASS_NAMES)
    assert bc["w4a16_gemm"]["total_us"] == pytest.approx(102.0)
    assert bc["lora"]["total_us"] == pytest.approx(20.0) and bc["lora"]["calls"] == 4
    assert bc["attention"]["total_us"] == pytest.approx(26.0)
    assert bc["moe"]["total_us"] == pytest.approx(2.0)
    assert bc["norm_act"]["total_us"] == pytest.approx(4.0)
    assert bc["gemm_other"]["total_us"] == pytest.approx(12.0)
    assert bc["other"]["total_us"] == pytest.approx(9.0)   # 2 x rotary + argmax
    assert bc["memcpy"]["total_us"] == pytest.approx(3.0)
    assert bc["memset"]["total_us"] == pytest.approx(1.0)
    assert sum(v["share"] for v in bc.values()) == pytest.approx(1.0)
    assert sum(v["total_us"] for v in bc.values()) == pytest.approx(TOTAL)
    assert s["gpu_span_us"] == pytest.approx(1621.0 - 1000.0)
    assert s["steps"] is None and s["decode_step_us"] is None


def test_summarize_trace_steps_and_decode_attribution(tmp_path):
    path = _write(tmp_path / "t.json", synthetic_events())
    s = pr.summarize_trace(path, steps=2)
    assert s["steps"] == 2 and s["decode_step_us"] == pytest.approx(TOTAL / 2)
    assert s["step_annotations"] == 3
    dec = s["by_step_kind"]["decode"]
    assert dec["count"] == 2 and dec["count_with_gpu_work"] == 2
    assert dec["gpu_us_total"] == pytest.approx(2 * DECODE_SUM + 4.0)
    assert dec["gpu_us_per_step_median"] == pytest.approx(DECODE_SUM + 2.0)  # (60 + 64) / 2
    assert dec["gpu_us_per_step_mean"] == pytest.approx(DECODE_SUM + 2.0)
    assert dec["gpu_period_us_median"] == pytest.approx(200.0)
    assert dec["gpu_span_us_per_step_median"] > dec["gpu_us_per_step_median"]  # 1 us gaps
    assert dec["by_class"]["w4a16_gemm"]["total_us"] == pytest.approx(62.0)
    assert dec["by_class"]["moe"]["calls"] == 1
    assert sum(v["share"] for v in dec["by_class"].values()) == pytest.approx(1.0)
    pre = s["by_step_kind"]["prefill"]
    assert pre["count"] == 1 and pre["gpu_us_total"] == pytest.approx(50.0)
    assert pre["gpu_period_us_median"] is None
    assert s["unattributed_us"] == pytest.approx(5.0)   # argmax + memcpy + memset
    text = pr.format_summary(s, top=3)
    assert "decode steps: 2" in text and "w4a16_gemm" in text and "machete" in text


def test_summarize_trace_gpu_annotation_fallback(tmp_path):
    """Without runtime (launch) events, kernels are attributed via gpu_user_annotation windows."""
    path = _write(tmp_path / "t.json.gz", synthetic_events(with_runtime=False), gz=True)
    s = pr.summarize_trace(path)
    dec = s["by_step_kind"]["decode"]
    assert dec["gpu_us_total"] == pytest.approx(2 * DECODE_SUM + 4.0)
    assert s["by_step_kind"]["prefill"]["gpu_us_total"] == pytest.approx(50.0)
    assert s["unattributed_us"] == pytest.approx(5.0)


def test_summarize_trace_no_annotations_bare_list_and_empty(tmp_path):
    ev = [e for e in synthetic_events() if e.get("cat") not in ("user_annotation",
                                                                "gpu_user_annotation")]
    s = pr.summarize_trace(_write(tmp_path / "a.json", ev, wrap=False), top=100)
    assert s["total_gpu_us"] == pytest.approx(TOTAL)
    assert s["by_step_kind"] == {} and s["unattributed_us"] is None
    assert len(s["kernels"]) == s["distinct_kernels"] == 11
    assert sum(k["share"] for k in s["kernels"]) == pytest.approx(1.0)
    e = pr.summarize_trace(_write(tmp_path / "e.json", []), steps=4)
    assert e["total_gpu_us"] == 0 and e["kernels"] == [] and e["decode_step_us"] == 0
    assert all(v["share"] == 0 for v in e["by_class"].values())
    (tmp_path / "bad.json").write_text("3")
    with pytest.raises(ValueError, match="not a Chrome trace"):
        pr.summarize_trace(str(tmp_path / "bad.json"))


# ------------------------------------------------------------------ settings -> engine kwargs


def test_profiling_off_by_default_kwargs_unchanged():
    assert ve.profiler_config(None) is None and ve.profiler_config("") is None
    kw = ve.build_llm_kwargs("/m", {"seed": 1}, lora={"rank": 16, "slots": 1,
                                                      "target_modules": ["q_proj"]},
                             quantization=None)
    assert "profiler_config" not in kw
    assert not any("PROFILER" in k for k in ve.kernel_env("machete", None))


def test_profile_dir_gives_torch_profiler_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = ve.build_llm_kwargs("/m", {}, lora=None, quantization=None, profile_dir="prof")
    assert kw["profiler_config"] == {
        "profiler": "torch",
        "torch_profiler_dir": str(tmp_path / "prof"),
        "torch_profiler_with_stack": False,
        "torch_profiler_use_gzip": True,
        "torch_profiler_record_shapes": False,
    }
    # other keys unchanged by profiling
    base = ve.build_llm_kwargs("/m", {}, lora=None, quantization=None)
    assert {k: v for k, v in kw.items() if k != "profiler_config"} == base


def _model_dir(tmp_path):
    """A checkpoint folder as far as the engine reads it before vLLM does: its config.json."""
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"model_type": "mistral"}')
    return str(d)


# ------------------------------------------------------------------ profile_decode (fake vLLM)


class _ProfFakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list = []
        self.profiling = False
        outer = self

        class _Core:
            def shutdown(self_inner):
                outer.shut = True

        self.llm_engine = SimpleNamespace(engine_core=_Core(), add_lora=lambda req: True)
        _ProfFakeLLM.instances.append(self)

    def start_profile(self, profile_prefix=None):
        cfg = self.kwargs.get("profiler_config")
        if not cfg:
            raise RuntimeError("Profiling is not enabled. Please set --profiler-config")
        self.profiling = True
        self.calls.append("start")

    def stop_profile(self):
        self.calls.append("stop")
        d = self.kwargs["profiler_config"]["torch_profiler_dir"]
        os.makedirs(d, exist_ok=True)
        from pathlib import Path
        _write(Path(d) / "dp0_pp0_tp0_dcp0_ep0_rank0.1234567890.pt.trace.json.gz",
               synthetic_events(), gz=True)
        Path(d, "profiler_out_0.txt").write_text("table\n")
        os.write(1, b"INFO 11-23 07:30:00 [wrapper.py:90] Profiler stopped successfully.\n")
        self.profiling = False

    def generate(self, prompts, sp, *, lora_request=None, use_tqdm=True):
        assert self.profiling, "generate must run between start_profile and stop_profile"
        self.calls.append(("generate", prompts, sp.kw, lora_request))
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], metrics=None,
                                outputs=[SimpleNamespace(token_ids=list(range(sp.kw["max_tokens"])))])
                for p in prompts]


@pytest.fixture
def prof_vllm(monkeypatch):
    return install_fake_vllm(monkeypatch, _ProfFakeLLM)


def test_profile_decode_with_fake_vllm(prof_vllm, tmp_path):
    prof_dir = tmp_path / "vllm-prof"
    eng = ve.VllmEngine(_model_dir(tmp_path), engine_config({"backend": "vllm", "quantization": "w4a16"}),
                        log_path=str(tmp_path / "e.log"), profile_dir=str(prof_dir))
    llm = _ProfFakeLLM.instances[-1]
    assert llm.kwargs["profiler_config"]["torch_profiler_dir"] == str(prof_dir)
    out = tmp_path / "bench" / "profile"
    s = eng.profile_decode([[1, 2, 3]], 3, [None], str(out))
    assert llm.calls[0] == "start" and llm.calls[-1] == "stop"
    _, prompts, sp, loras = llm.calls[1]
    assert sp == dict(temperature=0.0, max_tokens=3, min_tokens=3, ignore_eos=True,
                      detokenize=False)
    assert s["decode_steps"] == 2 and s["steps"] == 2 and s["batch_size"] == 1
    assert s["decode_step_us"] == pytest.approx(TOTAL / 2)
    assert s["by_step_kind"]["decode"]["gpu_us_per_step_median"] == pytest.approx(DECODE_SUM + 2)
    assert s["tpot_s_median"] is None and s["e2e_s"] >= 0
    trace = out / "dp0_pp0_tp0_dcp0_ep0_rank0.1234567890.pt.trace.json.gz"
    assert s["trace_files"] == [str(trace)] and trace.is_file()
    assert not list(prof_dir.glob("*.pt.trace.json*"))   # moved, not copied
    saved = json.loads((out / "profile_summary.json").read_text())
    assert saved["total_gpu_us"] == pytest.approx(TOTAL)
    assert "Profiler stopped successfully" in (tmp_path / "e.log").read_text()
    with pytest.raises(ValueError, match="max_new_tokens must be >= 2"):
        eng.profile_decode([[1]], 1, [None], str(out))
    eng.close()
    with pytest.raises(RuntimeError, match="live engine"):
        eng.profile_decode([[1]], 4, [None], str(out))


def test_profile_decode_requires_profile_dir(prof_vllm, tmp_path):
    eng = ve.VllmEngine(_model_dir(tmp_path), engine_config({"backend": "vllm", "quantization": "w4a16"}),
                        log_path=str(tmp_path / "e.log"))
    assert "profiler_config" not in _ProfFakeLLM.instances[-1].kwargs
    with pytest.raises(RuntimeError, match="built with a profile_dir"):
        eng.profile_decode([[1]], 4, [None], str(tmp_path / "o"))
    eng.close()
