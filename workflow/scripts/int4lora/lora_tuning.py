"""Tuned Punica (Triton LoRA) kernel configs for vLLM 0.26: keys, files, lookup and grid.

Pure parts (no vLLM, no CUDA); workflow/scripts/tune_lora_kernels.py does the GPU timing.
Facts from the vLLM 0.26.0 source (paths under vllm/):

- Files (lora/ops/triton_ops/utils.py:164-195, load_lora_op_config, lru_cached): read from
  $VLLM_TUNED_CONFIG_FOLDER as "{gpu}_SHRINK.json" and "{gpu}_EXPAND_{TRUE|FALSE}.json"
  (add_inputs), gpu = torch.cuda.get_device_name() with " " and "-" -> "_". The fused MoE
  LoRA ops have their own files "{gpu}_FUSED_MOE_LORA_{W13|W2}_{SHRINK|EXPAND}.json".
  An empty or missing file -> vLLM's defaults (utils.py:278-280). VLLM_BATCH_INVARIANT=1
  ignores the folder (utils.py:168).
- Layout: data[max_loras][num_slices][m][k][n] (+[moe_intermediate_size] for fused MoE),
  all keys strings. Lookup (utils.py:283-312): exact key, else the key nearest by
  |int(key) - value| (first of equals in file order) for max_loras, m, k, n; num_slices
  must match exactly (a missing one is a KeyError inside the engine).
- Dimensions the dense ops ask for (lora_shrink_op.py:197-209, lora_expand_op.py:206-220):
  max_loras = lora_ids.size(0) = engine max_loras + 1 (lora_kernel_metadata.py:67, the +1
  is the "no LoRA" id); m = tokens in the call (x.size(0), CUDA-graph padded);
  shrink: k = input size, n = max_lora_rank; expand: k = max_lora_rank, n = the largest
  output slice (utils.py:274; utils.py:150 MAX_N). The fused MoE ops pass max_loras itself
  (punica_gpu.py:542-559, 673-690) and k = rank, n = hidden for shrink and expand alike.
- Fields read: shrink block_m, block_n, block_k, split_k, num_warps, num_stages, num_ctas,
  group_size_m (optional, default 8) (lora_shrink_op.py:210-217); expand block_m, block_n,
  block_k, num_warps, num_ctas, num_stages (lora_expand_op.py:222-227). A missing one is a
  KeyError, so every config we write starts from vLLM's own default dict.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

OPS = ("shrink", "expand")
FUSED_MOE_OPS = ("fused_moe_lora_w13_shrink", "fused_moe_lora_w13_expand",
                 "fused_moe_lora_w2_shrink", "fused_moe_lora_w2_expand")
SHRINK_FIELDS = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_ctas",
                 "num_stages")
EXPAND_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_ctas", "num_stages")
# Modules whose LoRA runs through the fused MoE LoRA ops (not tuned here).
FUSED_MOE_MODULES = ("experts",)
# vLLM's default CUDA-graph capture sizes (config/vllm.py:1824-1843).
DEFAULT_MAX_CAPTURE = 512
# Candidate configs per key: the grids below stay within this (checked when built, tested).
MAX_GRID_PER_KEY = 48


def gpu_file_prefix(gpu_name: str) -> str:
    """torch.cuda.get_device_name() as vLLM puts it in file names (utils.py:169-171)."""
    if not gpu_name or not str(gpu_name).strip():
        raise ValueError(f"gpu_name must be a non-empty device name, got {gpu_name!r}")
    return str(gpu_name).replace(" ", "_").replace("-", "_")


def config_filename(gpu_name: str, op: str, add_inputs: bool | None = None) -> str:
    """The file vLLM reads for one op (utils.py:173-180)."""
    if op == "expand":
        if add_inputs is None:
            raise ValueError("expand needs add_inputs True or False (EXPAND_TRUE/EXPAND_FALSE)")
        return f"{gpu_file_prefix(gpu_name)}_EXPAND_{str(bool(add_inputs)).upper()}.json"
    if op == "shrink" or op in FUSED_MOE_OPS:
        return f"{gpu_file_prefix(gpu_name)}_{op.upper()}.json"
    raise ValueError(f"unknown LoRA op {op!r} (known: {', '.join(OPS + FUSED_MOE_OPS)})")


def _nearest(level: dict, value: int, what: str) -> dict:
    """utils.py:285-286 and 292-303: exact string key, else the nearest integer key."""
    if not level:
        raise KeyError(f"no {what} keys to choose from")
    return level.get(str(value)) or level[min(level.keys(), key=lambda x: abs(int(x) - value))]


def lookup_config(config_data: dict, max_loras: int, num_slices: int, m: int, k: int, n: int,
                  moe_intermediate_size: int | None = None) -> dict:
    """Mirror of vLLM's lookup in get_lora_op_configs (utils.py:283-312); max_loras is the
    value the op passes (engine max_loras + 1 for shrink/expand). num_slices is exact."""
    level = _nearest(config_data, max_loras, "max_loras")
    level = level[str(num_slices)]
    level = _nearest(level, m, "m")
    level = _nearest(level, k, "k")
    level = _nearest(level, n, "n")
    if moe_intermediate_size is not None:
        level = _nearest(level, moe_intermediate_size, "moe_intermediate_size")
    return level


def capture_sizes(max_capture: int = DEFAULT_MAX_CAPTURE) -> list[int]:
    """vLLM's default CUDA-graph capture sizes up to max_capture (config/vllm.py:1824-1843)."""
    sizes = [i for i in (1, 2, 4) if i <= max_capture]
    sizes += list(range(8, min(max_capture + 1, 256), 8))
    sizes += list(range(256, max_capture + 1, 16))
    return sorted(set(sizes))


def padded_tokens(n: int, max_capture: int = DEFAULT_MAX_CAPTURE) -> int:
    """The m an op sees for n scheduled tokens: padded up to the next capture size when a CUDA
    graph runs the step, else n itself (eager above the largest capture size)."""
    if int(n) < 1:
        raise ValueError(f"token count must be >= 1, got {n!r}")
    return next((s for s in capture_sizes(max_capture) if s >= n), int(n))


def _arch_int(arch: dict, name: str) -> int:
    value = arch.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"architecture needs a positive integer {name!r}, got {value!r}")
    return value


def module_io(arch: dict, module: str) -> tuple[int, tuple[int, ...]]:
    """(input size, output slice sizes) of a module vLLM wraps, at tensor parallel 1.

    qkv_proj: MergedQKVParallelLinearWithLoRA, slices (q, k, v) (column_parallel_linear.py:
    460-464); gate_up_proj: MergedColumnParallelLinearWithLoRA, (gate, up) (:201-204);
    o_proj, down_proj, gate (MoE router, ReplicatedLinear): one slice; lm_head:
    LogitsProcessorWithLoRA, one slice of vocab_size (layers/logits_processor.py:93-111);
    embed_tokens: VocabParallelEmbeddingWithLoRA, expand only, one slice of hidden_size.
    """
    hidden = _arch_int(arch, "hidden_size")
    heads = _arch_int(arch, "num_attention_heads")
    head_dim = arch.get("head_dim") or hidden // heads
    kv_heads = arch.get("num_key_value_heads") or heads
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    if module == "qkv_proj":
        return hidden, (q_size, kv_size, kv_size)
    if module == "o_proj":
        return q_size, (hidden,)
    if module == "gate_up_proj":
        inter = _arch_int(arch, "intermediate_size")
        return hidden, (inter, inter)
    if module == "down_proj":
        return _arch_int(arch, "intermediate_size"), (hidden,)
    if module == "gate":
        return hidden, (_arch_int(arch, "num_local_experts"),)
    if module == "lm_head":
        return hidden, (_arch_int(arch, "vocab_size"),)
    if module == "embed_tokens":
        return 0, (hidden,)
    raise ValueError(f"unknown LoRA module {module!r} (known: qkv_proj, o_proj, gate_up_proj, "
                     f"down_proj, gate, lm_head, embed_tokens, experts)")


def vllm_default_wrapped_modules(architecture: str, arch: dict) -> list[str]:
    """What vLLM 0.26 wraps with LoRA when LoRAConfig.target_modules is None: every LinearBase
    suffix, every MoE runner and the model's embedding_modules (lora/utils.py:219-240).
    MistralForCausalLM sets embedding_modules = {} (models/mistral.py:230-232); Llama and
    Mixtral list embed_tokens and lm_head (models/llama.py:461-464, models/mixtral.py:389-392)."""
    name = str(architecture).lower()
    moe = bool(arch.get("num_local_experts") or arch.get("num_experts"))
    linears = ["qkv_proj", "o_proj"] + (["gate", "experts"] if moe else
                                         ["gate_up_proj", "down_proj"])
    if name == "qwen2_moe":  # shared expert MLP and its gate are linears too (qwen2_moe.py)
        return linears + ["gate_up_proj", "down_proj", "shared_expert_gate"]
    if name in ("mistral", "qwen2"):  # embedding_modules = {} (interfaces.py:560 default)
        return linears
    if name in ("llama", "mixtral", "qwen3", "qwen3_moe"):
        return linears + ["embed_tokens", "lm_head"]
    raise ValueError(f"unknown architecture {architecture!r} (known: mistral, llama, mixtral, "
                     "qwen2, qwen3, qwen2_moe, qwen3_moe)")


@dataclass(frozen=True)
class KernelKey:
    """One lookup vLLM makes: the file (op, add_inputs) and the path in it."""
    op: str
    add_inputs: bool | None
    max_loras: int  # as the op passes it: engine max_loras + 1
    num_slices: int
    m: int
    k: int
    n: int

    def path(self) -> tuple[str, ...]:
        return tuple(str(v) for v in (self.max_loras, self.num_slices, self.m, self.k, self.n))

    def label(self) -> str:
        op = self.op if self.add_inputs is None else f"expand_{str(self.add_inputs).lower()}"
        return f"{op}[{'/'.join(self.path())}]"


def lookup_args(key: KernelKey) -> dict:
    """The arguments vLLM's op passes to get_lora_op_configs for this key (lora_shrink_op.py:
    202-209, lora_expand_op.py:213-221; k, n from hidden_size, rank as in utils.py:274)."""
    hidden, rank = (key.k, key.n) if key.op == "shrink" else (key.n, key.k)
    args = {"op_type": key.op, "max_loras": key.max_loras, "batch": key.m,
            "hidden_size": hidden, "rank": rank, "num_slices": key.num_slices}
    if key.op == "expand":
        args["add_inputs"] = key.add_inputs
    return args


def key_from_lookup(op_type: str, max_loras: int, batch: int, hidden_size: int, rank: int,
                    num_slices: int, add_inputs: bool | None = None,
                    moe_intermediate_size: int | None = None) -> KernelKey:
    """The key a get_lora_op_configs call reads (inverse of lookup_args)."""
    if op_type not in OPS:
        raise ValueError(f"not a dense LoRA op: {op_type!r}")
    k, n = (hidden_size, rank) if op_type == "shrink" else (rank, hidden_size)
    flag = None if op_type == "shrink" else bool(add_inputs)
    return KernelKey(op_type, flag, max_loras, num_slices, batch, k, n)


@dataclass
class Workload:
    """A key with the tensor shapes that produce it (first module wins on shared keys)."""
    key: KernelKey
    input_size: int                  # shrink: K; expand: unused (0)
    slice_sizes: tuple[int, ...]     # expand: per-slice output sizes; shrink: (rank,) * slices
    modules: list[str] = field(default_factory=list)
    phase: str = "decode"            # "decode" or "prefill"


def _positive_ints(values, what: str) -> list[int]:
    out = []
    for v in values or []:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} must hold positive integers, got {v!r}")
        out.append(v)
    return out


def _module_keys(arch, module, rank, loras_key, m, add_inputs, lm_m):
    """(KernelKey, input_size, slice_sizes) pairs one call of a module produces."""
    in_size, slices = module_io(arch, module)
    mm = lm_m if module == "lm_head" else m
    out = []
    if module != "embed_tokens":
        out.append((KernelKey("shrink", None, loras_key, len(slices), mm, in_size, rank),
                    in_size, (rank,) * len(slices)))
    flags = (True,) if module in ("lm_head", "embed_tokens") else add_inputs
    for flag in flags:
        out.append((KernelKey("expand", bool(flag), loras_key, len(slices), mm, rank,
                              max(slices)), 0, slices))
    return out


def enumerate_workloads(arch: dict, wrapped_modules: list[str] | None, max_rank: int,
                        max_loras: int, batch_sizes: list[int],
                        prefill_tokens: list[int] | None = None,
                        add_inputs: Iterable[bool] = (True,),
                        max_capture: int = DEFAULT_MAX_CAPTURE) -> list[Workload]:
    """Every (op, max_loras, num_slices, m, k, n) the engine will look up, decode first.

    Decode m = a batch size padded to its CUDA-graph size; prefill m = the token counts given
    (e.g. batch * prompt_tokens), padded the same way. lm_head runs on the sampled rows only
    (v1/worker/gpu_model_runner.py:4428-4429: one per request), so its m is the batch size.
    add_inputs: expand files to fill; True is vLLM's path (punica_gpu.py:249), False the
    dual-stream path (layers/base_linear.py:269-277). Fused MoE modules are skipped here.
    """
    rank = _positive_ints([max_rank], "max_rank")[0]
    loras = _positive_ints([max_loras], "max_loras")[0]
    batches = _positive_ints(batch_sizes, "batch_sizes")
    prefills = _positive_ints(prefill_tokens, "prefill_tokens")
    if not batches:
        raise ValueError("batch_sizes must name at least one batch size")
    if not wrapped_modules:
        raise ValueError("wrapped_modules must name at least one module vLLM wraps")
    modules = [m for m in wrapped_modules if m not in FUSED_MOE_MODULES]
    flags = tuple(dict.fromkeys(bool(f) for f in add_inputs)) or (True,)
    seen: dict[KernelKey, Workload] = {}
    for phase, tokens in [("decode", b) for b in batches] + [("prefill", t) for t in prefills]:
        m = padded_tokens(tokens, max_capture)
        for module in modules:
            if module == "lm_head" and phase == "prefill":
                continue  # one logits row per request: the decode keys already cover it
            for key, in_size, slices in _module_keys(arch, module, rank, loras + 1, m, flags,
                                                     tokens):
                wl = seen.setdefault(key, Workload(key, in_size, slices, [], phase))
                if module not in wl.modules:
                    wl.modules.append(module)
    return list(seen.values())


def lora_keys(*args, **kwargs) -> list[tuple]:
    """enumerate_workloads as plain tuples (op, add_inputs, max_loras, num_slices, m, k, n)."""
    return [(w.key.op, w.key.add_inputs, w.key.max_loras, w.key.num_slices, w.key.m, w.key.k,
             w.key.n) for w in enumerate_workloads(*args, **kwargs)]


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _block_m_choices(m: int, big: tuple[int, ...]) -> tuple[int, ...]:
    return (16,) if m <= 16 else (16, 32) if m <= 64 else big


def _shrink_grid(m: int, k: int, n: int) -> list[dict]:
    # block_n above the rank would break do_shrink_kernel's contiguity hint on offset_n % N
    # (kernel_utils.py:289); block_k * split_k above K leaves split programs idle.
    block_n = [b for b in (16, 32, 64) if b <= max(16, _pow2_at_least(n))][:2]
    decode = m <= 64
    block_k = (64, 128, 256) if decode else (32, 64, 128)
    split_k = (8, 16, 32, 64) if decode else (1, 4, 8, 16)
    grid = []
    for bm in _block_m_choices(m, (32, 64)):
        for bn in block_n:
            for bk in block_k:
                for sk in split_k:
                    if bk * sk > max(k, bk):
                        continue
                    # software pipelining only pays with a few K iterations per program
                    iters = math.ceil(k / (bk * sk))
                    for stages in ((2, 3) if iters > 2 and decode else (2,)):
                        grid.append({"block_m": bm, "block_n": bn, "block_k": bk,
                                     "split_k": sk, "num_warps": 4, "num_stages": stages})
    return grid


def _expand_grid(m: int, k: int, n: int) -> list[dict]:
    decode = m <= 64
    block_k = [b for b in (16, 32, 64) if b <= max(16, _pow2_at_least(k))][:2]
    block_n = (32, 64, 128, 256) if decode else (64, 128, 256)
    warps = (2, 4) if decode else (4, 8)
    grid = []
    for bm in _block_m_choices(m, (32, 64, 128)):
        for bn in block_n:
            for bk in block_k:
                for nw in warps:
                    grid.append({"block_m": bm, "block_n": bn, "block_k": bk,
                                 "num_warps": nw, "num_stages": 2})
    return grid


def parameter_grid(key: KernelKey) -> list[dict]:
    """Grid overrides for one key (merged onto vLLM's default dict before use)."""
    if key.op not in OPS:
        raise ValueError(f"no grid for op {key.op!r}")
    grid = (_shrink_grid if key.op == "shrink" else _expand_grid)(key.m, key.k, key.n)
    if len(grid) > MAX_GRID_PER_KEY:  # a grid edit that would blow the time budget
        raise AssertionError(f"{key.label()}: {len(grid)} grid points > {MAX_GRID_PER_KEY}")
    return grid


def candidate_configs(default: dict, key: KernelKey) -> list[dict]:
    """vLLM's default first, then each grid point merged onto it (duplicates dropped)."""
    required = SHRINK_FIELDS if key.op == "shrink" else EXPAND_FIELDS
    missing = [f for f in required if f not in default]
    if missing:
        raise ValueError(f"default config for {key.label()} lacks {missing}: {default}")
    out, seen = [dict(default)], {json.dumps(default, sort_keys=True)}
    for point in parameter_grid(key):
        cand = {**default, **point}
        tag = json.dumps(cand, sort_keys=True)
        if tag not in seen:
            seen.add(tag)
            out.append(cand)
    return out


def outputs_agree(candidate, reference, op: str) -> tuple[bool, float]:
    """Whether a candidate's output matches the reference output, and the max error relative
    to max|reference|. Shrink writes fp32 (split-K atomics reorder sums: ~1e-6 relative);
    expand writes the model dtype after two roundings (accumulator -> dtype, + y), each of
    which may land one bf16 ulp (<= 2^-7 relative) apart: allow 2^-6 of the largest value.
    A wrong tile or split (a slice or K-chunk missed) gives errors of order 1."""
    import torch
    if candidate.shape != reference.shape:
        return False, float("inf")
    ref = reference.float()
    scale = float(ref.abs().max()) or 1.0
    err = float((candidate.float() - ref).abs().max()) / scale
    if not math.isfinite(err):
        return False, float("inf")
    limit = 1e-4 if op == "shrink" else 2.0 ** -6
    return bool(err <= limit) and bool(torch.isfinite(candidate).all()), err


def reference_shrink(x, a_slices, scale: float):
    """out[s] = scale * x @ A_s[0,0].T (punica_gpu.py:101-104 semantics, LoRA slot 0), summed
    in float64 so that no TF32 setting can blur it, returned as fp32 like vLLM's buffer."""
    import torch
    return torch.stack([scale * (x.double() @ a[0, 0].double().T) for a in a_slices]).float()


def reference_expand(y0, buf, b_slices):
    """y0 with slice s += buf[s] @ B_s[0,0].T, rounded as the kernel does (the fp32 buffer is
    cast to the weight dtype before the dot, kernel_utils.py:75-76; the product is rounded
    to the output dtype, then added: kernel_utils.py:215, 231-234)."""
    out, offset = y0.clone(), 0
    for s, b in enumerate(b_slices):
        w = b[0, 0]
        prod = (buf[s].to(w.dtype).double() @ w.double().T).to(y0.dtype)
        out[:, offset:offset + w.shape[0]] += prod
        offset += w.shape[0]
    return out


def tune_key(candidates: list[dict], measure: Callable[[dict], dict],
             deadline: Callable[[], bool]) -> dict:
    """Measure candidates (default first) until done or out of time; keep the fastest one
    whose output agreed. measure(config) -> {"us": float | None, "agrees": bool,
    "error": str | None}. A candidate that disagrees or fails never wins."""
    tried, best = [], None
    for i, cfg in enumerate(candidates):
        if i > 0 and deadline():
            break
        got = {"config": cfg, **measure(cfg)}
        tried.append(got)
        ok = got.get("agrees") and got.get("us") is not None and not got.get("error")
        if i == 0 and not ok:
            raise RuntimeError(f"vLLM's default config did not run cleanly: {got}")
        if ok and (best is None or got["us"] < best["us"]):
            best = got
    return {"best": best, "default": tried[0], "tried": tried,
            "complete": len(tried) == len(candidates)}


def nest_configs(entries: list[tuple[KernelKey, dict]]) -> dict[str, dict]:
    """{file tag: data[max_loras][num_slices][m][k][n] = config}; tag "SHRINK",
    "EXPAND_TRUE" or "EXPAND_FALSE". Two configs for one key are an error."""
    files: dict[str, dict] = {}
    for key, cfg in entries:
        tag = "SHRINK" if key.op == "shrink" else f"EXPAND_{str(bool(key.add_inputs)).upper()}"
        level = files.setdefault(tag, {})
        *parents, last = key.path()
        for part in parents:
            level = level.setdefault(part, {})
        if last in level and level[last] != cfg:
            raise ValueError(f"two configs for {key.label()}: {level[last]} and {cfg}")
        level[last] = dict(cfg)
    return files


def write_config_files(out_dir: str | os.PathLike, gpu_name: str,
                       entries: list[tuple[KernelKey, dict]]) -> list[str]:
    """Write vLLM's JSON files (each atomically) and remove this GPU's other LoRA config files
    in out_dir, which vLLM would otherwise read beside ours. Returns the paths written."""
    from .resultio import write_json_atomic
    out = Path(out_dir)
    files = nest_configs(entries)
    prefix = gpu_file_prefix(gpu_name)
    written = []
    for tag, data in sorted(files.items()):
        path = out / f"{prefix}_{tag}.json"
        write_json_atomic(path, data)
        written.append(str(path))
    for tag in ("SHRINK", "EXPAND_TRUE", "EXPAND_FALSE"):
        if tag not in files:
            (out / f"{prefix}_{tag}.json").unlink(missing_ok=True)
    return written


def summary_row(wl: Workload, outcome: dict | None, chosen: dict, status: str,
                default_us: float | None, tuned_us: float | None) -> dict:
    """One line of the summary: default vs tuned kernel time for a key."""
    key = asdict(wl.key)
    tried = outcome["tried"] if outcome else []
    return {**key, "label": wl.key.label(), "modules": list(wl.modules), "phase": wl.phase,
            "status": status, "default_us": default_us, "tuned_us": tuned_us,
            "speedup": (default_us / tuned_us) if default_us and tuned_us else None,
            "config": chosen,
            "candidates": len(tried),
            "rejected_wrong_output": sum(1 for t in tried if t.get("agrees") is False
                                         and not t.get("error")),
            "failed": sum(1 for t in tried if t.get("error"))}


def format_summary(rows: list[dict]) -> str:
    """A plain-text table of summary rows (for logs and the CLI)."""
    lines = [f"{'key':<40} {'modules':<24} {'status':<14} {'default_us':>10} {'tuned_us':>9}"]
    for r in rows:
        d = "-" if r["default_us"] is None else f"{r['default_us']:.2f}"
        t = "-" if r["tuned_us"] is None else f"{r['tuned_us']:.2f}"
        lines.append(f"{r['label']:<40} {','.join(r['modules']):<24} {r['status']:<14} "
                     f"{d:>10} {t:>9}")
    return "\n".join(lines)
