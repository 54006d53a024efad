"""Unit tests of the vLLM backend's pure parts (no vLLM, no GPU needed).

Log lines below are built from the vLLM 0.26.0 format strings (docs/notes/vllm-engine.md).
"""
from __future__ import annotations

import json
import math
import os
import sys
from types import SimpleNamespace

import pytest

from conftest import install_fake_vllm
from int4lora.config import engine_config
from int4lora.engines import vllm as ve
from int4lora.logcapture import FdCapture
from int4lora.engines.base import BatchTiming, ScoredSequence

# ------------------------------------------------------------------ build_llm_kwargs


def test_module_imports_without_vllm():
    assert "vllm" not in sys.modules or getattr(sys.modules["vllm"], "_is_fake", False)


def test_build_llm_kwargs_defaults_and_passthrough():
    settings = {"gpu_memory_utilization": 0.8, "max_model_len": 2048, "max_num_seqs": 64,
                "seed": 1, "dtype": "bfloat16", "preload_adapters": False}
    kw = ve.build_llm_kwargs("/m", settings, lora=None, quantization=None)
    assert kw["model"] == "/m"
    assert kw["enforce_eager"] is False
    assert kw["disable_log_stats"] is False  # needed for RequestOutput.metrics
    assert kw["enable_prefix_caching"] is False
    assert kw["max_logprobs"] == 20
    assert kw["gpu_memory_utilization"] == 0.8 and kw["max_model_len"] == 2048
    assert kw["max_num_seqs"] == 64 and kw["seed"] == 1 and kw["dtype"] == "bfloat16"
    assert "quantization" not in kw and "enable_lora" not in kw
    assert "preload_adapters" not in kw  # ours, not vLLM's
    assert "compilation_config" not in kw  # vLLM's own default without capture sizes


def test_build_llm_kwargs_lora_and_bnb():
    settings = {"enforce_eager": True, "max_logprobs": 50, "max_num_batched_tokens": 8192}
    lora = {"rank": 64, "slots": 2, "adapters": 5, "target_modules": ["q_proj", "v_proj"]}
    kw = ve.build_llm_kwargs("/m", settings, lora=lora, quantization="bitsandbytes",
                             capture_sizes=[1, 8, 128], model_type="mistral")
    assert kw["enable_lora"] is True and kw["max_loras"] == 2 and kw["max_lora_rank"] == 64
    assert kw["max_cpu_loras"] == 5  # every loaded adapter stays in the CPU cache
    assert kw["lora_target_modules"] == ["qkv_proj"]
    assert kw["quantization"] == "bitsandbytes"
    assert kw["enforce_eager"] is True and kw["max_logprobs"] == 50
    assert kw["max_num_batched_tokens"] == 8192
    assert kw["compilation_config"] == {"cudagraph_capture_sizes": [1, 8, 128]}
    # the preset's own compilation_config wins over the derived capture sizes
    own = ve.build_llm_kwargs("/m", {"compilation_config": {"mode": 0}}, lora=None,
                              quantization=None, capture_sizes=[1])
    assert own["compilation_config"] == {"mode": 0}


def test_lora_engine_args_restrict_and_defaults():
    lora = {"rank": 16, "slots": 1, "adapters": 3, "target_modules": ["q_proj", "v_proj"],
            "target_parameters": ["mlp.experts.gate_up_proj"]}
    args = ve.lora_engine_args(lora, "mixtral")
    assert args["lora_target_modules"] == ["experts", "qkv_proj"]
    assert args["max_loras"] == 1 and args["max_cpu_loras"] == 3
    # vLLM's defaults: every LoRA-capable linear (no restriction passed)
    assert "lora_target_modules" not in ve.lora_engine_args(lora, "mixtral", restrict=False)
    assert ve.lora_engine_args(None, "mixtral") == {}


@pytest.mark.parametrize("rank,expected", [(1, 1), (8, 8), (12, 16), (16, 16), (24, 32),
                                           (320, 320), (500, 512), (512, 512)])
def test_lora_engine_args_round_rank_up_to_an_allowed_one(rank, expected):
    lora = {"rank": rank, "slots": 1, "target_modules": ["q_proj"]}
    assert ve.lora_engine_args(lora, "llama")["max_lora_rank"] == expected


def test_build_llm_kwargs_errors():
    with pytest.raises(ValueError, match="LoRA rank 1024 exceeds vLLM's largest"):
        ve.lora_engine_args({"rank": 1024, "slots": 1, "target_modules": ["q_proj"]}, "llama")
    with pytest.raises(ValueError, match="quantization='awq'"):
        ve.build_llm_kwargs("/m", {}, lora=None, quantization="awq")


# ------------------------------------------------------------------ kernel_env


def test_kernel_env_auto_and_none():
    assert ve.kernel_env(None, None) == {}
    assert ve.kernel_env("auto", None) == {}


def test_kernel_env_machete_disables_all_others():
    env = ve.kernel_env("machete", None)
    disabled = env["VLLM_DISABLED_KERNELS"].split(",")
    assert "MacheteLinearKernel" not in disabled
    assert {"MarlinLinearKernel", "AllSparkLinearKernel", "CutlassW4A8LinearKernel",
            "ExllamaLinearKernel", "TritonW4A16LinearKernel"} <= set(disabled)


def test_kernel_env_marlin_and_tuned_dir(tmp_path):
    env = ve.kernel_env("Marlin", str(tmp_path))
    disabled = env["VLLM_DISABLED_KERNELS"].split(",")
    assert "MacheteLinearKernel" in disabled and "MarlinLinearKernel" not in disabled
    assert env["VLLM_TUNED_CONFIG_FOLDER"] == str(tmp_path)
    assert ve.kernel_env(None, "rel/dir")["VLLM_TUNED_CONFIG_FOLDER"] == os.path.abspath("rel/dir")


def test_kernel_env_unknown():
    with pytest.raises(ValueError, match=r"unknown w4a16_kernel 'cublas'.*machete.*marlin"):
        ve.kernel_env("cublas", None)


def test_tuned_lora_config_filenames():
    names = ve.tuned_lora_config_filenames("NVIDIA H100 80GB HBM3")
    assert "NVIDIA_H100_80GB_HBM3_SHRINK.json" in names
    assert "NVIDIA_H100_80GB_HBM3_EXPAND_TRUE.json" in names
    assert "NVIDIA_H100_80GB_HBM3_FUSED_MOE_LORA_W2_EXPAND.json" in names


# ------------------------------------------------------------------ parse_engine_log

EC = "(EngineCore pid=4242) "
DENSE_LOG = "\n".join([
    "INFO 11-23 07:19:50 [utils.py:253] non-default args: {'model': '/cache/w4a16', 'enable_lora': True}",
    EC + "INFO 11-23 07:20:01 [compressed_tensors_wNa16.py:137] Using MacheteLinearKernel for CompressedTensorsWNA16",
    EC + "Loading safetensors checkpoint shards:   0% Completed | 0/2 [00:00<?, ?it/s]\r"
         "Loading safetensors checkpoint shards: 100% Completed | 2/2 [00:01<00:00,  1.50it/s]",
    EC + "INFO 11-23 07:20:03 [gpu_model_runner.py:5348] Model loading took 5.43 GiB memory and 3.210000 seconds",
    EC + "INFO 11-23 07:20:20 [monitor.py:53] torch.compile took 12.34 s in total",
    EC + "INFO 11-23 07:20:22 [monitor.py:82] Initial profiling/warmup run took 1.10 s",
    EC + "INFO 11-23 07:20:23 [gpu_worker.py:561] Available KV cache memory: 60.12 GiB",
    EC + "INFO 11-23 07:20:23 [kv_cache_utils.py:2177] GPU KV cache size: 492,336 tokens",
    EC + "INFO 11-23 07:20:23 [kv_cache_utils.py:2179] Maximum concurrency for 4,096 tokens per request: 120.20x",
    EC + "WARNING 11-23 07:20:24 [utils.py:279] Using default LoRA kernel configs",
    EC + "INFO 11-23 07:20:33 [gpu_model_runner.py:6845] Graph capturing finished in 9 secs, took 0.56 GiB",
    EC + "INFO 11-23 07:20:33 [core.py:341] init engine (profile, create kv cache, warmup model) took 45.67 s (compilation: 12.34 s)",
    "/usr/lib/python3/site-packages/torch/x.py:10: UserWarning: something odd",
    EC + "WARNING 11-23 07:20:24 [utils.py:279] Using default LoRA kernel configs",
])

MOE_LOG = "\n".join([
    EC + "INFO 11-23 08:00:01 [compressed_tensors_wNa16.py:137] Using MarlinLinearKernel for CompressedTensorsWNA16",
    EC + "INFO 11-23 08:00:01 [compressed_tensors_moe.py:175] Using CompressedTensorsWNA16MarlinMoEMethod",
    EC + "INFO 11-23 08:00:02 [int_wna16.py:206] Using 'MARLIN' WNA16 MoE backend.",
    EC + "INFO 11-23 08:00:05 [gpu/model_runner.py:306] Model loading took 2.10 GiB and 1.000000 seconds",
    EC + "INFO 11-23 08:00:09 [utils.py:188] Using tuned LoRA kernel configs from /cfg/NVIDIA_H100_80GB_HBM3_SHRINK.json.",
    EC + "INFO 11-23 08:00:30 [core.py:348] init engine (profile, create kv cache, warmup model) took 20.50 s",
])


def test_parse_engine_log_dense():
    r = ve.parse_engine_log(DENSE_LOG)
    assert r["w4a16_kernels"] == ["MacheteLinearKernel"]
    assert r["moe_kernel"] is None
    assert r["lora_kernel_configs"] == "default"
    assert r["model_weights_gib"] == pytest.approx(5.43)
    assert r["model_load_s"] == pytest.approx(3.21)
    assert r["kv_cache_gib"] == pytest.approx(60.12)
    assert r["kv_cache_tokens"] == 492336
    assert r["cuda_graph_gib"] == pytest.approx(0.56)
    assert r["cuda_graph_s"] == pytest.approx(9.0)
    assert r["compile_s"] == pytest.approx(12.34)
    assert r["engine_init_s"] == pytest.approx(45.67)
    assert r["warnings"] == ["Using default LoRA kernel configs", "UserWarning: something odd"]


def test_parse_engine_log_moe_and_tuned():
    r = ve.parse_engine_log(MOE_LOG)
    assert r["w4a16_kernels"] == ["MarlinLinearKernel"]
    assert r["moe_kernel"] == "CompressedTensorsWNA16MarlinMoEMethod/MARLIN"
    assert r["lora_kernel_configs"] == "tuned"
    assert r["model_weights_gib"] == pytest.approx(2.10)
    assert r["engine_init_s"] == pytest.approx(20.5)
    assert r["compile_s"] is None and r["cuda_graph_gib"] is None
    assert r["kv_cache_gib"] is None and r["kv_cache_tokens"] is None


def test_parse_engine_log_mixed_lora_configs_and_moe_variants():
    text = "\n".join([
        "WARNING 11-23 08:00:09 [utils.py:184] No LoRA kernel configs found in /cfg/X_EXPAND_TRUE.json",
        "WARNING 11-23 08:00:09 [utils.py:279] Using default LoRA kernel configs",
        "INFO 11-23 08:00:09 [utils.py:188] Using tuned LoRA kernel configs from /cfg/X_SHRINK.json.",
        "INFO 11-23 08:00:09 [unquantized.py:222] Using TRITON Unquantized MoE LoRA backend",
        "INFO 11-23 08:00:10 [core.py:341] init engine (profile, create kv cache, warmup model) took 3.00 s (compilation: 1.50 s \u2014 language_model: 1.50 s, encoder: 0.00 s)",
    ])
    r = ve.parse_engine_log(text)
    assert r["lora_kernel_configs"] == "mixed"
    assert r["moe_kernel"] == "TRITON"
    assert r["compile_s"] == pytest.approx(1.5)
    assert r["engine_init_s"] == pytest.approx(3.0)
    assert "No LoRA kernel configs found in /cfg/X_EXPAND_TRUE.json" in r["warnings"]


def test_parse_engine_log_empty_and_colored():
    r = ve.parse_engine_log("")
    assert r["w4a16_kernels"] == [] and r["warnings"] == []
    assert all(r[k] is None for k in r if k not in ("w4a16_kernels", "warnings"))
    colored = "\x1b[36m(EngineCore pid=1)\x1b[0m \x1b[32mINFO\x1b[0m 11-23 07:20:23 [gpu_worker.py:561] Available KV cache memory: 1.5 GiB"
    assert ve.parse_engine_log(colored)["kv_cache_gib"] == pytest.approx(1.5)


def test_parse_engine_log_last_occurrence_wins():
    text = ("INFO 11-23 07:20:23 [gpu_worker.py:561] Available KV cache memory: 1.0 GiB\n"
            "INFO 11-23 07:30:23 [gpu_worker.py:561] Available KV cache memory: 2.0 GiB\n")
    assert ve.parse_engine_log(text)["kv_cache_gib"] == 2.0


# ------------------------------------------------------------------ timing


def _out(prompt_len, n_out, metrics):
    return SimpleNamespace(prompt_token_ids=list(range(prompt_len)),
                           outputs=[SimpleNamespace(token_ids=list(range(100, 100 + n_out)))],
                           metrics=metrics)


def _metrics(ttft, first_ts, last_ts, n):
    return SimpleNamespace(arrival_time=1.7e9, queued_ts=first_ts - 0.2, scheduled_ts=first_ts - 0.1,
                           first_token_ts=first_ts, last_token_ts=last_ts,
                           first_token_latency=ttft, num_generation_tokens=n, is_corrupted=False)


def test_timing_from_request_metrics():
    outs = [_out(5, 4, _metrics(0.05, 10.0, 10.3, 4)), _out(7, 4, _metrics(0.06, 10.01, 10.61, 4))]
    t = ve.timing_from_outputs(outs, e2e_s=0.7)
    assert isinstance(t, BatchTiming)
    assert t.e2e_s == 0.7
    assert t.ttft_s == pytest.approx([0.05, 0.06])
    assert t.tpot_s == pytest.approx([0.1, 0.2])
    assert t.prompt_tokens == 12 and t.output_tokens == 8
    assert t.output_token_ids == [[100, 101, 102, 103]] * 2
    # engine side: queued (first_ts - 0.2 in _metrics) -> first token, the engine-core clock
    assert t.ttft_engine_s == pytest.approx([0.2, 0.2])


def test_timing_single_token_tpot_zero():
    t = ve.timing_from_outputs([_out(3, 1, _metrics(0.02, 5.0, 5.0, 1))], e2e_s=0.03)
    assert t.ttft_s == [0.02] and t.tpot_s == [0.0]


def test_timing_fallback_without_metrics():
    outs = [_out(4, 5, None), _out(4, 5, None)]
    t = ve.timing_from_outputs(outs, e2e_s=1.0, ttft_fallback_s=0.2)
    assert t.ttft_s == [0.2, 0.2]
    assert t.tpot_s == pytest.approx([0.2, 0.2])
    t2 = ve.timing_from_outputs(outs, e2e_s=1.0)  # equal-share estimate
    assert t2.ttft_s == pytest.approx([0.2, 0.2])
    assert not any(math.isnan(x) for x in t2.ttft_s + t2.tpot_s)
    # metrics object present but never filled (stats disabled in some other version)
    t3 = ve.timing_from_outputs([_out(4, 5, _metrics(0.0, 0.0, 0.0, 0))], e2e_s=1.0,
                                ttft_fallback_s=0.5)
    assert t3.ttft_s == [0.5] and t3.tpot_s == pytest.approx([0.125])


# ------------------------------------------------------------------ prompt logprobs


def _lp(logprob, rank):
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=None)


def test_prompt_logprobs_to_scored():
    tokens = [7, 3, 9]
    plp = [
        None,
        # actual token 3 is rank 2, inserted first (as vLLM does), then top-2
        {3: _lp(-1.2, 2), 5: _lp(-0.5, 1)},
        # actual token 9 outside the top-2: rank 40, dict has 3 entries
        {9: _lp(-6.0, 40), 1: _lp(-0.1, 1), 2: _lp(-2.5, 2)},
    ]
    s = ve.prompt_logprobs_to_scored(tokens, plp, top_k=2)
    assert isinstance(s, ScoredSequence)
    assert s.target_logprobs == [-1.2, -6.0]
    assert s.top_ids == [[5, 3], [1, 2]]
    assert s.top_logprobs == [[-0.5, -1.2], [-0.1, -2.5]]


def test_prompt_logprobs_errors():
    with pytest.raises(ValueError, match="entries for 3 tokens"):
        ve.prompt_logprobs_to_scored([1, 2, 3], [None, {2: _lp(-1, 1)}], top_k=1)
    with pytest.raises(ValueError, match="lacks the actual token 2"):
        ve.prompt_logprobs_to_scored([1, 2], [None, {5: _lp(-1, 1)}], top_k=1)


# ------------------------------------------------------------------ engine with a fake vllm


class _FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.added = []
        self.calls = []
        self.shutdown = False
        outer = self

        class _Core:
            def shutdown(self_inner):
                outer.shutdown = True

        class _Eng:
            engine_core = _Core()

            def add_lora(self_inner, req):
                outer.added.append(req)
                return True

        self.llm_engine = _Eng()
        os.write(1, b"INFO 11-23 07:20:01 [compressed_tensors_wNa16.py:137] Using MacheteLinearKernel for CompressedTensorsWNA16\n")
        os.write(2, b"INFO 11-23 07:20:23 [gpu_worker.py:561] Available KV cache memory: 3.25 GiB\n")
        _FakeLLM.instances.append(self)

    def generate(self, prompts, sp, *, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, sp, lora_request, use_tqdm))
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            n = sp.kw.get("max_tokens", 16)
            plp = None
            if sp.kw.get("prompt_logprobs"):
                plp = [None] + [{t: _lp(-1.0, 3), 0: _lp(-0.1, 1)} for t in ids[1:]]
            outs.append(SimpleNamespace(
                prompt_token_ids=ids, prompt_logprobs=plp,
                outputs=[SimpleNamespace(token_ids=list(range(n)))],
                metrics=_metrics(0.01, 1.0, 1.0 + 0.002 * (n - 1), n)))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = install_fake_vllm(monkeypatch, _FakeLLM)
    monkeypatch.delenv("VLLM_DISABLED_KERNELS", raising=False)
    return mod


def _adapter(tmp_path, name, r=16):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": r}))
    return str(d)


def _model_dir(tmp_path):
    """A checkpoint folder as far as the engine reads it before vLLM does: its config.json."""
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"model_type": "mistral"}')
    return str(d)


def _cfg(**kw):
    return engine_config({"backend": "vllm", "quantization": "w4a16", **kw})


LORA = {"rank": 16, "slots": 1, "adapters": 2, "target_modules": ["q_proj", "v_proj"]}


def test_engine_flow_with_fake_vllm(fake_vllm, tmp_path):
    adapters = {"a": _adapter(tmp_path, "a"), "b": _adapter(tmp_path, "b")}
    log = tmp_path / "logs" / "engine.log"
    eng = ve.VllmEngine(_model_dir(tmp_path), _cfg(w4a16_kernel="machete"), adapters=adapters, lora=LORA,
                        log_path=str(log))
    llm = _FakeLLM.instances[-1]
    assert os.environ["VLLM_DISABLED_KERNELS"].startswith("CutlassW4A8LinearKernel")
    assert [r.lora_int_id for r in llm.added] == [1, 2]
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_cpu_loras"] == 2
    assert llm.kwargs["lora_target_modules"] == ["qkv_proj"]
    # the applied-tensor report ships a function to the engine core: allowed for this engine
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"

    t = eng.generate([[1, 2, 3], [4, 5]], 8, ["a", None])
    prompts, sp, loras, tqdm = llm.calls[-1]
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]
    assert sp.kw == dict(temperature=0.0, max_tokens=8, min_tokens=8, ignore_eos=True,
                         detokenize=False)
    assert loras[0].lora_name == "a" and loras[1] is None and tqdm is False
    assert t.output_tokens == 16 and t.prompt_tokens == 5
    assert t.tpot_s == pytest.approx([0.002, 0.002]) and eng.timing_source == "request_metrics"

    scored = eng.score([[1, 2, 3]], [None], top_k=2)
    assert llm.calls[-1][2] is None  # all-base batch -> lora_request=None
    assert llm.calls[-1][1].kw["prompt_logprobs"] == 2
    assert scored[0].target_logprobs == [-1.0, -1.0] and scored[0].top_ids[0] == [0, 2]
    with pytest.raises(ValueError, match="top_k=50 exceeds"):
        eng.score([[1, 2]], [None], top_k=50)

    assert eng.greedy([[1]], 3, ["b"]) == [[0, 1, 2]]
    with pytest.raises(KeyError, match="unknown adapter"):
        eng.generate([[1]], 2, ["zzz"])
    with pytest.raises(ValueError, match="2 adapter entries for 1 prompts"):
        eng.generate([[1]], 2, [None, None])

    info = eng.info()
    assert info["vllm_version"] == "0.26.0-fake"
    assert info["engine_log"]["w4a16_kernels"] == ["MacheteLinearKernel"]
    assert info["adapters"]["b"]["id"] == 2
    mem = eng.memory()
    assert mem["engine_kv_cache_gib"] == pytest.approx(3.25)
    assert "Available KV cache memory" in log.read_text()

    eng.close()
    assert llm.shutdown is True
    assert "VLLM_DISABLED_KERNELS" not in os.environ
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in os.environ
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate([[1]], 2, [None])
    eng.close()  # idempotent


def test_engine_rejects_bad_adapters(fake_vllm, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter 'gone': no directory"):
        ve.VllmEngine(_model_dir(tmp_path), _cfg(), adapters={"gone": str(tmp_path / "gone")}, lora=LORA)
    with pytest.raises(ValueError, match="without a LoRA plan"):
        ve.VllmEngine(_model_dir(tmp_path), _cfg(), adapters={"a": _adapter(tmp_path, "a")})
    eng = ve.VllmEngine(_model_dir(tmp_path), _cfg(), log_path=str(tmp_path / "x.log"))
    with pytest.raises(ValueError, match="without LoRA support"):
        eng.generate([[1]], 2, ["a"])
    eng.close()


def test_vllm_settings_are_checked_against_engine_args():
    from int4lora.config import ConfigError
    with pytest.raises(ConfigError, match="settings.max_modle_len: not a vLLM 0.26.0 EngineArgs"):
        _cfg(settings={"max_modle_len": 512})
    with pytest.raises(ConfigError, match="settings.max_loras: set by the pipeline"):
        _cfg(settings={"max_loras": 4})
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization=1.5: must be in \(0, 1\]"):
        _cfg(settings={"gpu_memory_utilization": 1.5})
    assert _cfg(settings={"specialize_active_lora": True}).settings["specialize_active_lora"]


def test_fd_capture_tees_back(tmp_path, capfd):
    cap = FdCapture(str(tmp_path / "c.log"))
    with cap.capture():
        os.write(1, b"from-stdout\n")
        os.write(2, b"from-stderr\n")
    text = cap.text()
    assert "from-stdout" in text and "from-stderr" in text
    err = capfd.readouterr().err
    assert "from-stdout" in err and "from-stderr" in err
