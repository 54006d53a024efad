"""tune_lora_kernels.py on the CPU: main() without a GPU, bad input, the CLI, and tune()
end to end with vLLM's real LoRAKernelMeta (loaded from vLLM's 0.26 source file, which needs
only torch), stand-in shrink/expand ops with vLLM's semantics and config lookup, and a
stand-in CUDA clock. These check the harness's wiring, never a kernel's speed."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import VLLM_SRC, without_vllm_src
from int4lora import lora_tuning as lt

MISTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000}
BATCHES = [1, 8, 32, 64]
META_IN_PACKAGE = "lora/ops/triton_ops/lora_kernel_metadata.py"


def _kernel_meta_module():
    """vLLM's lora_kernel_metadata.py (imports only torch) without importing vllm itself:
    the unpacked source tree, else an installed vllm package; skip when neither exists."""
    paths = [VLLM_SRC / META_IN_PACKAGE]
    spec = importlib.util.find_spec("vllm")
    if spec and spec.submodule_search_locations:
        paths += [Path(p) / META_IN_PACKAGE for p in spec.submodule_search_locations]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        without_vllm_src(f"vLLM's {META_IN_PACKAGE}")
    mspec = importlib.util.spec_from_file_location("vllm_lora_kernel_metadata", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def test_forced_config_patches_and_restores_the_op_lookup():
    import tune_lora_kernels as tlk

    def real(op_type, max_loras, batch, hidden_size, rank, num_slices, add_inputs=None,
             moe_intermediate_size=None):
        return {"default": True}

    module = SimpleNamespace(get_lora_op_configs=real)
    ops = SimpleNamespace(modules={"shrink": module})
    seen = []
    with tlk.forced_config(ops, "shrink", {"split_k": 8}, seen):
        got = module.get_lora_op_configs("shrink", max_loras=2, batch=1, hidden_size=4096,
                                         rank=16, num_slices=3)
    assert got == {"split_k": 8} and module.get_lora_op_configs is real
    key = lt.KernelKey("shrink", None, 2, 3, 1, 4096, 16)
    assert seen == [(key, {"split_k": 8})]
    tlk._check_lookup(seen, key)
    with pytest.raises(RuntimeError, match="predicted"):
        tlk._check_lookup(seen, lt.KernelKey("shrink", None, 1, 3, 1, 4096, 16))
    with tlk.forced_config(ops, "shrink", None, seen := []):
        assert module.get_lora_op_configs("shrink", 2, 1, 4096, 16, 3) == {"default": True}


@pytest.mark.parametrize("device, words", [("cpu", "CUDA GPU"), ("cuda", "no CUDA GPU")])
def test_main_without_gpu_is_unsupported(tmp_path, result_validator, device, words):
    import tune_lora_kernels as tlk
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "tuning.json"
    res = tlk.main(MISTRAL, ["qkv_proj"], 16, 1, BATCHES, str(tmp_path / "cfg"), str(out),
                   device=device, model="mistral-7b-shape")
    assert res["status"] == "unsupported" and words in res["reason"]
    assert res["kind"] == "tuning" and res["params"]["keys"][0] == "shrink[2/3/1/4096/16]"
    saved = json.loads(out.read_text())
    result_validator.validate(saved)
    assert saved["status"] == "unsupported"
    assert not (tmp_path / "cfg").exists()


def test_main_bad_input_writes_nothing(tmp_path):
    import tune_lora_kernels as tlk
    out = tmp_path / "tuning.json"
    with pytest.raises(ValueError, match="'q_proj'"):
        tlk.main(MISTRAL, ["q_proj"], 16, 1, BATCHES, str(tmp_path / "cfg"), str(out))
    with pytest.raises(ValueError, match="time_budget_s"):
        tlk.main(MISTRAL, ["qkv_proj"], 16, 1, BATCHES, str(tmp_path / "cfg"), str(out),
                 time_budget_s=0)
    assert not out.exists()


def test_cli_reads_a_fetch_result(tmp_path, capsys):
    import tune_lora_kernels as tlk
    fetch = tmp_path / "fetch.json"
    fetch.write_text(json.dumps({"metrics": {"architecture": MISTRAL}}))
    res = tlk.cli(["--arch-json", str(fetch), "--out-dir", str(tmp_path / "cfg"),
                   "--device", "cpu", "--batch-sizes", "1", "8"])
    assert res["status"] == "unsupported"
    assert res["params"]["wrapped_modules"] == ["qkv_proj", "o_proj", "gate_up_proj",
                                                "down_proj"]
    assert (tmp_path / "cfg" / "tuning-result.json").exists()
    assert "unsupported" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        tlk.load_arch(str(bad))


SHRINK_DEFAULT = {"block_m": 32, "block_n": 16, "block_k": 256, "split_k": 64, "num_warps": 4,
                  "num_ctas": 1, "group_size_m": 8, "num_stages": 2, "max_nreg": None}
EXPAND_DEFAULT = {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_ctas": 1,
                  "num_stages": 2, "max_nreg": None}


def _shrink_cost(cfg):  # split_k 16 is fast but wrong; (128, 32) is the fastest right one
    return 0.5 if cfg["split_k"] == 16 else 2.0 if (cfg["block_k"], cfg["split_k"]) == (
        128, 32) else 4.0


def _expand_cost(cfg):  # block_n 256 is fast but wrong; (64, 2 warps) the fastest right one
    return 0.5 if cfg["block_n"] == 256 else 1.0 if (cfg["block_n"], cfg["num_warps"]) == (
        64, 2) else 3.0


def _fake_cuda(monkeypatch, clock):
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock.now

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) / 1e3  # ms

    class CUDAGraph:
        def replay(self):
            clock.now += self.cost

    @contextlib.contextmanager
    def graph(g):
        clock.recording, clock.captured = True, 0.0
        yield
        g.cost, clock.recording = clock.captured, False

    for name, value in {"Stream": Stream, "Event": Event, "CUDAGraph": CUDAGraph,
                        "graph": graph, "stream": lambda s: contextlib.nullcontext(),
                        "current_stream": Stream, "synchronize": lambda *a: None,
                        "get_device_properties": lambda d: SimpleNamespace(L2_cache_size=1),
                        "get_device_name": lambda *a: "FAKE GPU-1",
                        "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)


def _fake_ops(clock, evil_default=False):
    import functools
    meta = _kernel_meta_module()

    @functools.lru_cache
    def get_lora_op_configs(op_type, max_loras, batch, hidden_size, rank, num_slices,
                            add_inputs=None, moe_intermediate_size=None):
        return dict(SHRINK_DEFAULT if op_type == "shrink" else EXPAND_DEFAULT)

    mods = {op: SimpleNamespace(get_lora_op_configs=get_lora_op_configs) for op in lt.OPS}

    def run(cfg, cost, out):
        if clock.recording:
            clock.captured += cost(cfg)
        if cost(cfg) == 0.5 or (evil_default and cfg["num_warps"] == 4):
            out.view(-1)[3] += 10.0

    def shrink(x, ws, out, mapping, _s, _n, _l, lora_ids, _f, _a, scale):
        cfg = mods["shrink"].get_lora_op_configs("shrink", max_loras=lora_ids.size(0),
                                                 batch=x.size(0), hidden_size=x.size(1),
                                                 rank=ws[0].shape[-2], num_slices=len(ws))
        out.zero_()
        for s, w in enumerate(ws):
            out[s] = scale * torch.einsum("mk,mrk->mr", x.float(), w[mapping.long(), 0].float())
        run(cfg, _shrink_cost, out)

    def expand(buf, ws, y, mapping, _s, _n, _l, lora_ids, _f, _a, offset_start, add_inputs):
        cfg = mods["expand"].get_lora_op_configs(
            op_type="expand", max_loras=lora_ids.size(0), batch=buf.size(1),
            hidden_size=max(w.shape[2] for w in ws), rank=ws[0].shape[-1],
            num_slices=len(ws), add_inputs=add_inputs)
        off = offset_start
        for s, w in enumerate(ws):
            part = torch.einsum("mr,msr->ms", buf[s].to(w.dtype).float(),
                                w[mapping.long(), 0].float()).to(y.dtype)
            sl = y[:, off:off + w.shape[2]]
            sl.copy_(sl + part if add_inputs else part)
            off += w.shape[2]
        run(cfg, _expand_cost, y)

    utils = SimpleNamespace(is_batch_invariant=False, get_lora_op_configs=get_lora_op_configs,
                            load_lora_op_config=functools.lru_cache(lambda *a: None),
                            _LORA_A_PTR_DICT={}, _LORA_B_PTR_DICT={})
    return SimpleNamespace(meta=meta.LoRAKernelMeta, shrink=shrink, expand=expand,
                           modules=mods, utils=utils,
                           captured_counts=lambda n, spec: [n + 1])


def test_tune_end_to_end_with_stand_in_cuda(monkeypatch, tmp_path):
    import tune_lora_kernels as tlk
    clock = SimpleNamespace(now=0.0, recording=False, captured=0.0)
    _fake_cuda(monkeypatch, clock)
    monkeypatch.setattr(tlk, "vllm_lora_ops", lambda: _fake_ops(clock))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "/elsewhere")
    wls = lt.enumerate_workloads(MISTRAL, ["qkv_proj"], 16, 1, [1])
    metrics, samples = tlk.tune(wls, str(tmp_path), 1, "bfloat16", False, "cpu", 60)
    import os
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == "/elsewhere"  # restored
    shrink, expand = metrics["keys"]
    assert shrink["status"] == expand["status"] == "tuned"
    assert (shrink["config"]["block_k"], shrink["config"]["split_k"]) == (128, 32)
    assert (shrink["default_us"], shrink["tuned_us"]) == (4.0, 2.0)
    assert (expand["config"]["block_n"], expand["config"]["num_warps"]) == (64, 2)
    assert (expand["default_us"], expand["tuned_us"]) == (3.0, 1.0)
    assert shrink["rejected_wrong_output"] >= 1 and expand["rejected_wrong_output"] >= 1
    assert shrink["candidates"] == 1 + len(lt.parameter_grid(wls[0].key))
    assert all(s["us"] is None for s in samples if s["config"].get("block_n") == 256)
    assert metrics["gpu"] == "FAKE GPU-1" and metrics["config_folder"] == str(tmp_path)
    for wl, row in zip(wls, metrics["keys"]):
        data = json.loads((tmp_path / lt.config_filename("FAKE GPU-1", wl.key.op,
                                                         wl.key.add_inputs)).read_text())
        k = wl.key
        assert lt.lookup_config(data, k.max_loras, k.num_slices, k.m, k.k, k.n) == row["config"]

    late = tlk.tune(wls, str(tmp_path / "late"), 1, "bfloat16", False, "cpu", 1e-9)[0]
    assert [r["status"] for r in late["keys"]] == ["skipped_budget"] * 2
    assert [r["config"] for r in late["keys"]] == [SHRINK_DEFAULT, EXPAND_DEFAULT]


def test_tune_stops_when_the_default_disagrees_with_torch(monkeypatch, tmp_path):
    import tune_lora_kernels as tlk
    clock = SimpleNamespace(now=0.0, recording=False, captured=0.0)
    _fake_cuda(monkeypatch, clock)
    monkeypatch.setattr(tlk, "vllm_lora_ops", lambda: _fake_ops(clock, evil_default=True))
    wls = lt.enumerate_workloads(MISTRAL, ["qkv_proj"], 16, 1, [1])
    with pytest.raises(RuntimeError, match="torch reference"):
        tlk.tune(wls, str(tmp_path), 1, "bfloat16", False, "cpu", 60)
    assert not list(tmp_path.iterdir())


def test_tune_keeps_the_default_when_confirmation_reverses(monkeypatch, tmp_path):
    """A candidate that looked faster in the search but not in the interleaved confirmation
    replays (noise, winner's curse) loses to vLLM's default."""
    import tune_lora_kernels as tlk
    clock = SimpleNamespace(now=0.0, recording=False, captured=0.0)
    _fake_cuda(monkeypatch, clock)
    monkeypatch.setattr(tlk, "vllm_lora_ops", lambda: _fake_ops(clock))
    monkeypatch.setattr(tlk, "_confirm", lambda bench, graphs, default, best: (2.0, 2.1))
    wls = lt.enumerate_workloads(MISTRAL, ["qkv_proj"], 16, 1, [1])
    rows = tlk.tune(wls, str(tmp_path), 1, "bfloat16", False, "cpu", 60)[0]["keys"]
    assert [r["status"] for r in rows] == ["default_kept"] * 2
    assert [r["config"] for r in rows] == [SHRINK_DEFAULT, EXPAND_DEFAULT]
    assert all(r["default_us"] == r["tuned_us"] == 2.0 for r in rows)


def test_main_ok_result_follows_the_schema(monkeypatch, tmp_path, result_validator):
    import tune_lora_kernels as tlk
    clock = SimpleNamespace(now=0.0, recording=False, captured=0.0)
    _fake_cuda(monkeypatch, clock)
    monkeypatch.setattr(tlk, "vllm_lora_ops", lambda: _fake_ops(clock))
    monkeypatch.setattr(tlk, "cuda_missing_reason", lambda device: None)
    out = tmp_path / "tuning.json"
    res = tlk.main(MISTRAL, ["qkv_proj", "experts"], 16, 1, [1], str(tmp_path / "cfg"),
                   str(out), device="cpu", model="m")
    saved = json.loads(out.read_text())
    result_validator.validate(saved)
    assert res["status"] == saved["status"] == "ok"
    assert saved["params"]["not_tuned_modules"] == ["experts"]
    assert saved["metrics"]["status_counts"] == {"tuned": 2}
    assert len(saved["metrics"]["files"]) == 2 and len(saved["samples"]) > 20
    del saved["metrics"]["files"]
    with pytest.raises(Exception, match="files"):
        result_validator.validate(saved)


def test_main_with_only_fused_moe_modules_is_unsupported(monkeypatch, tmp_path):
    import tune_lora_kernels as tlk
    monkeypatch.setattr(tlk, "cuda_missing_reason", lambda device: None)
    res = tlk.main({**MISTRAL, "num_local_experts": 8}, ["experts"], 16, 1, [1],
                   str(tmp_path / "cfg"), str(tmp_path / "t.json"))
    assert res["status"] == "unsupported" and "fused MoE" in res["reason"]


def test_the_rules_entry_names_the_jobs_engine_and_adapter(tmp_path):
    """The result is results/tuning/<model>/<engine>/<adapter>.json and says so inside: the
    report sets the tuning gain beside that engine's LoRA cost (the H100 run of 2026-11-25 wrote
    engine "vllm" and no adapter for the vllm-tuned job)."""
    import yaml
    import tune_lora_kernels as tlk
    from conftest import ROOT
    from int4lora.config import job_plan
    from int4lora.resultio import new_result, write_result
    cfg = yaml.safe_load((ROOT / "config" / "gpu-lora-cost.yaml").read_text())
    plan = job_plan(cfg, "mistral-7b-shape", "vllm-tuned", "r16-qv")
    fetch = new_result("fetch", "mistral-7b-shape")
    fetch["metrics"] = {"architecture": {**MISTRAL, "model_type": "mistral"}}
    write_result(str(tmp_path / "fetch.json"), fetch)
    res = tlk.tune_for_job("mistral-7b-shape", plan, str(tmp_path / "fetch.json"),
                           str(tmp_path / "cache"), str(tmp_path / "tuning.json"),
                           cfg["benchmark"], "cpu")
    assert res["status"] == "unsupported"  # no CUDA here
    saved = json.loads((tmp_path / "tuning.json").read_text())
    assert (saved["model"], saved["engine"], saved["adapter"]) == (
        "mistral-7b-shape", "vllm-tuned", "r16-qv")
    assert saved["params"]["wrapped_modules"] == ["qkv_proj"]
