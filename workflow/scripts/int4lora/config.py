"""The pipeline's configuration: defaults, typed engine configs and checks the schema cannot express.

Defaults are declared once, as `default:` values in workflow/schemas/config.schema.json; Snakemake's
validate() fills them in at start-up and `with_defaults` does the same for callers outside Snakemake
(tests). Engine blocks become typed, validated dataclasses (`engine_config`). Nothing here imports an
engine, so the Snakefile can validate a config without vLLM or a GPU.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .lora_layout import VLLM_MAX_LORA_RANKS

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
# engine arguments the pipeline derives itself (from the adapters, the checkpoint, the stage)
VLLM_PIPELINE_ARGS = ("model", "enable_lora", "max_loras", "max_lora_rank", "lora_target_modules",
                      "quantization", "load_format", "disable_log_stats", "profiler_config")
# settings of ours, not vLLM's
VLLM_OWN_SETTINGS = ("preload_adapters",)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad key, value and limit."""


@lru_cache(maxsize=None)
def load_schema(name: str = "config") -> dict:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


@lru_cache(maxsize=None)
def vllm_engine_args() -> tuple[str, frozenset]:
    """(vLLM version, EngineArgs field names) recorded by tools/record-vllm-engine-args.py."""
    data = json.loads((SCHEMA_DIR.parents[1] / "resources" / "vllm-engine-args.json").read_text())
    return data["vllm"], frozenset(data["engine_args"])


def _default_filling_validator():
    import jsonschema

    base = jsonschema.validators.validator_for(load_schema())
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def with_defaults(instance: dict, part: str | None = None) -> dict:
    """A validated copy of a whole config, or of one part of it (a `definitions` entry such as
    "engine", or a top-level section such as "benchmark"), with the schema's defaults filled in;
    jsonschema's error names the bad key."""
    schema = load_schema()
    if part:
        fragment = schema["definitions"].get(part) or schema["properties"][part]
        schema = {**fragment, "definitions": schema["definitions"]}
    filled = copy.deepcopy(instance)
    _default_filling_validator()(schema).validate(filled)
    return filled


def schema_errors(config: dict) -> list[str]:
    """Every way `config` breaks the schema, one line each, naming the key by its dotted path
    (Snakemake's validate() stops at the first and prints the schema fragment instead)."""
    filled = copy.deepcopy(config)
    validator = _default_filling_validator()(load_schema())
    errors = []
    for error in sorted(validator.iter_errors(filled), key=lambda e: list(map(str, e.path))):
        where = ".".join(str(part) for part in error.absolute_path) or "top level"
        errors.append(f"{where}: {error.message}")
    return errors


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    backend: str
    quantization: str
    stages: tuple[str, ...] = ("baseline", "bench", "memory", "validate")
    batch_sizes: tuple[int, ...] | None = None
    multi_adapter: tuple[int, ...] | None = None
    profile_decode: dict | None = None
    resources: dict = field(default_factory=dict)
    setting: str | None = None

    def label(self) -> str:
        return self.setting or self.derived_label()

    def derived_label(self) -> str:
        return self.backend


@dataclass(frozen=True, kw_only=True)
class HfEngineConfig(EngineConfig):
    compute_dtype: str = "bfloat16"
    mode: str = "generate"
    quantize_experts: bool = True

    def derived_label(self) -> str:
        return "NF4" + (" + static cache + compile" if self.mode == "static-compile" else "")


@dataclass(frozen=True, kw_only=True)
class VllmEngineConfig(EngineConfig):
    group_size: int = 128
    w4a16_kernel: str = "auto"
    lora_modules: str = "adapter"
    lora_kernel_configs: str = "default"
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        errors = vllm_settings_errors(self.settings)
        if errors:
            raise ConfigError("; ".join(errors))

    def derived_label(self) -> str:
        if self.quantization == "bitsandbytes":
            base = "in-flight NF4"
        else:
            base = "W4A16" + ("" if self.w4a16_kernel == "auto" else f" {self.w4a16_kernel}")
        lora = "vLLM LoRA defaults" if self.lora_modules == "all" else "LoRA on adapter modules"
        tuned = " + tuned kernels" if self.lora_kernel_configs == "tuned" else ""
        return f"{base}, {lora}{tuned}"


def vllm_settings_errors(settings: dict, prefix: str = "settings") -> list[str]:
    """Keys that vLLM's EngineArgs does not have, keys the pipeline sets itself, values out of
    range; each message names the key and the value."""
    version, fields = vllm_engine_args()
    errors = []
    for key, value in settings.items():
        if key in VLLM_PIPELINE_ARGS:
            errors.append(f"{prefix}.{key}: set by the pipeline (from the adapters, the "
                          f"checkpoint and the stage), not by settings")
        elif key not in fields and key not in VLLM_OWN_SETTINGS:
            errors.append(f"{prefix}.{key}: not a vLLM {version} EngineArgs field")
    util = settings.get("gpu_memory_utilization")
    if util is not None and not (isinstance(util, (int, float)) and 0 < util <= 1):
        errors.append(f"{prefix}.gpu_memory_utilization={util!r}: must be in (0, 1]")
    return errors


ENGINE_TYPES = {"hf": HfEngineConfig, "vllm": VllmEngineConfig}


def engine_config(raw: dict | EngineConfig) -> EngineConfig:
    """The typed config of one engine block (defaults filled in from the schema)."""
    if isinstance(raw, EngineConfig):
        return raw
    filled = with_defaults(raw, "engine")
    cls = ENGINE_TYPES[filled["backend"]]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in filled.items() if k in names}
    return cls(**kwargs)


def _context_length(spec: dict) -> int | None:
    arch = spec.get("arch") or {}
    return arch.get("max_position_embeddings")


def check_config(config: dict, models: dict | None = None) -> list[str]:
    """Cross-field checks the JSON schema cannot express; each error names the key, the value and
    the limit. `config` has its defaults filled in; `models` is the subset being run."""
    errors = []
    bench = config["benchmark"]
    engines, adapters = config["engines"], config["adapters"]
    if bench["max_iterations"] < bench["min_iterations"]:
        errors.append(f"benchmark.max_iterations={bench['max_iterations']} is below "
                      f"benchmark.min_iterations={bench['min_iterations']}")
    for name, eng in engines.items():
        if eng["backend"] == "vllm":
            errors += vllm_settings_errors(eng.get("settings") or {}, f"engines.{name}.settings")
    from .architectures import config_errors
    models = models or config["models"]
    errors += config_errors(models)
    for name, spec in models.items():
        errors += _model_errors(name, spec, config)
    errors += _cache_dir_errors(config["cache_dir"])
    for name, ad in adapters.items():
        if not (ad.get("target_modules") or ad.get("target_parameters")):
            errors.append(f"adapters.{name}: no target_modules or target_parameters")
    return errors


def _model_errors(name: str, spec: dict, config: dict) -> list[str]:
    from .architectures import spec_is_moe
    errors = []
    bench, val = config["benchmark"], config["validation"]
    engines, adapters = config["engines"], config["adapters"]
    for engine in spec["engines"]:
        if engine not in engines:
            errors.append(f"models.{name}.engines: unknown engine {engine!r} "
                          f"(configured: {', '.join(engines)})")
    for adapter in spec["adapters"]:
        if adapter not in adapters:
            errors.append(f"models.{name}.adapters: unknown adapter {adapter!r} "
                          f"(configured: {', '.join(adapters)})")
            continue
        ad = adapters[adapter]
        if ad.get("moe_only") and not spec_is_moe(spec):
            errors.append(f"models.{name}.adapters: adapter {adapter!r} targets MoE experts "
                          f"but {name!r} is not a MoE model")
        uses_vllm = any(engines.get(e, {}).get("backend") == "vllm" for e in spec["engines"])
        if uses_vllm and ad["rank"] > max(VLLM_MAX_LORA_RANKS):
            errors.append(f"adapters.{adapter}.rank={ad['rank']} is above vLLM's limit "
                          f"{max(VLLM_MAX_LORA_RANKS)} (model {name!r})")
    if spec.get("source") == "local":
        local = Path(spec["path"]).expanduser()
        if not (local / "config.json").is_file():
            what = "has no config.json" if local.is_dir() else "is not a directory"
            errors.append(f"models.{name}.path={spec['path']!r}: {local} {what} (a local model "
                          f"is a folder in Hugging Face layout)")
    context = _context_length(spec)
    needs = {"benchmark.prompt_tokens + benchmark.output_tokens":
             bench["prompt_tokens"] + bench["output_tokens"],
             "validation.prompt_tokens": val["prompt_tokens"],
             "validation.perplexity.seq_len": val["perplexity"]["seq_len"]}
    for what, tokens in needs.items():
        if context is not None and tokens > context:
            errors.append(f"{what}={tokens} exceeds model {name!r}'s context "
                          f"max_position_embeddings={context}")
        for engine in spec["engines"]:
            limit = (engines.get(engine, {}).get("settings") or {}).get("max_model_len")
            if limit is not None and tokens > limit:
                errors.append(f"{what}={tokens} exceeds engines.{engine}.settings."
                              f"max_model_len={limit} (model {name!r})")
    return errors


def _cache_dir_errors(cache_dir: str) -> list[str]:
    path = Path(cache_dir).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return [f"cache_dir={cache_dir!r}: {probe} is not a directory"]
    # a real write: os.access() answers yes to root on a read-only mount or /proc
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".int4lora-write-check-").cleanup()
    except OSError as exc:
        return [f"cache_dir={cache_dir!r}: cannot create a folder in {probe} ({exc.strerror})"]
    return []


# vLLM's default largest CUDA-graph size (CompilationConfig.max_cudagraph_capture_size)
VLLM_MAX_CAPTURE = 512


def capture_sizes(batch_sizes: list[int], prompt_tokens: int) -> list[int]:
    """The CUDA-graph sizes (tokens per step) a vLLM engine captures: the decode steps of every
    measured batch and the prefill steps that fit vLLM's default largest graph. Capturing only
    these starts the engine faster than vLLM's ~67 default sizes, and the prefill of a measured
    batch still runs from a graph (as with vLLM's defaults, which `vllm bench latency` uses)."""
    prefill = [b * prompt_tokens for b in batch_sizes if b * prompt_tokens <= VLLM_MAX_CAPTURE]
    return sorted(set(batch_sizes) | set(prefill))


def job_plan(config: dict, model: str, engine: str, adapter: str | None = None) -> dict:
    """What one bench / memory / validate job runs, resolved once from the config (batch sizes,
    multi-adapter batches, LoRA slots, the engine block with its defaults) and recorded in its
    result as what ran. lora-xN needs N distinct adapter copies; batches smaller than N run no
    lora-xN (the bench records why)."""
    eng = with_defaults(config["engines"][engine], "engine")
    bench = with_defaults(config.get("benchmark") or {}, "benchmark")
    multi = eng["multi_adapter"] if eng.get("multi_adapter") is not None \
        else bench["multi_adapter"]
    plan = {"model": model, "engine": engine, "backend": eng["backend"],
            "setting": engine_config(eng).label(), "engine_cfg": eng,
            "batch_sizes": sorted(eng.get("batch_sizes") or bench["batch_sizes"]),
            "capture_sizes": capture_sizes(eng.get("batch_sizes") or bench["batch_sizes"],
                                           bench["prompt_tokens"]),
            "adapter": None, "multi_adapter": [], "multi_adapter_skipped": [], "slots": 0}
    if adapter:
        spec = with_defaults(config["adapters"][adapter], "adapter")
        copies = spec["copies"]
        plan["multi_adapter"] = sorted(n for n in multi if 1 < n <= copies)
        plan["multi_adapter_skipped"] = [
            {"variant": f"lora-x{n}", "reason": f"needs {n} distinct adapters; {adapter} has "
             f"copies={copies}"} for n in sorted(multi) if n > 1 and n > copies]
        plan["slots"] = max([1, *plan["multi_adapter"]])
        plan["adapter"] = {"name": adapter, **{k: spec.get(k) for k in (
            "rank", "alpha", "target_modules", "target_parameters", "copies")}}
    return plan


def lora_plan(plan: dict, adapters_loaded: int) -> dict | None:
    """What an engine needs to know of the adapters a job serves: rank, targets, LoRA slots (the
    distinct adapters one batch carries) and how many adapters it loads."""
    if not plan.get("adapter"):
        return None
    ad = plan["adapter"]
    return {"rank": ad["rank"], "slots": max(1, plan["slots"]), "adapters": adapters_loaded,
            "target_modules": ad.get("target_modules"),
            "target_parameters": ad.get("target_parameters")}
