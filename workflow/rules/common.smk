"""Config validation, wildcard constraints and input functions (no logic in the rules)."""
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))

from int4lora.config import ConfigError, check_config, job_plan, schema_errors  # noqa: E402

# every schema error at once, one line each naming the key (validate() below then has none)
_errors = schema_errors(config)
if _errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(_errors))
# fills in the schema's defaults (presets hold only what differs from them)
validate(config, schema="../schemas/config.schema.json", set_default=True)

PRESET = config["preset"]
# every preset keeps its own results, logs and benchmarks, so presets never overwrite each other
RESULTS = f"results/{PRESET}"
LOGS = f"logs/{PRESET}"
BENCHMARKS = f"benchmarks/{PRESET}"
MODELS = config["models"]
if config.get("only_models"):
    # run a subset of the matrix (e.g. one model per GPU lease); the report covers that subset
    unknown = sorted(set(config["only_models"]) - set(MODELS))
    if unknown:
        raise ConfigError(f"only_models: unknown model(s) {unknown} "
                          f"(configured: {', '.join(MODELS)})")
    MODELS = {name: MODELS[name] for name in config["only_models"]}
ENGINES = config["engines"]
ADAPTERS = config["adapters"]

_errors = check_config(config, MODELS)
if _errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(_errors))

# JIT caches (vLLM's torch.compile cache, Triton, Inductor) live in cache_dir, shared by every
# job of the run: a later engine of the same configuration starts without recompiling. Set after
# the config check: torch creates its Inductor cache folder on import, before cache_dir is checked
for _var, _sub in (("VLLM_CACHE_ROOT", "vllm"), ("TRITON_CACHE_DIR", "triton"),
                   ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ.setdefault(_var, str(Path(config["cache_dir"]).expanduser().resolve() / "jit" / _sub))


def alternation(names):
    return "|".join(sorted(names, key=len, reverse=True))


wildcard_constraints:
    model=alternation(MODELS),
    engine=alternation(ENGINES),
    adapter=alternation(ADAPTERS),


def backend(wildcards):
    return ENGINES[wildcards.engine]["backend"]


def engine_env(wildcards):
    return str(Path(workflow.basedir) / "envs" / f"{backend(wildcards)}.yaml")


def uses_gpu(wildcards):
    return 1 if config["device"].startswith("cuda") else 0


def engine_resource(key, default):
    def get(wildcards):
        return ENGINES[wildcards.engine].get("resources", {}).get(key, default)
    return get


# Timed jobs (and the heavy engine jobs) take every core given with --cores, so that no other job
# runs beside them; a cluster executor gives every job its own share (set by the profile).
ALL_CORES = workflow.resource_settings.cores or 1


def plan(adapter_from_wildcards: bool):
    """The job's resolved settings (int4lora.config.job_plan), one resolution per job."""
    def get(wildcards):
        adapter = getattr(wildcards, "adapter", None) if adapter_from_wildcards else None
        return job_plan(config, wildcards.model, wildcards.engine,
                        None if adapter == "none" else adapter)
    return get


def matrix():
    """(model, engine, adapter) triples of the configured matrix."""
    for model, spec in MODELS.items():
        for engine in spec["engines"]:
            for adapter in spec["adapters"]:
                yield model, engine, adapter


def model_json(wildcards):
    return f"{RESULTS}/models/{wildcards.model}.json"


def tuned(engine):
    """A vLLM engine that runs with LoRA kernel configs tuned on this GPU."""
    return ENGINES[engine]["backend"] == "vllm" and ENGINES[engine]["lora_kernel_configs"] == "tuned"


def adapter_inputs(wildcards):
    """The adapter of a LoRA job, and the tuned kernel configs where its engine uses them."""
    adapter = getattr(wildcards, "adapter", "none")
    if adapter == "none":
        return {}
    inputs = {"adapter_json": f"{RESULTS}/adapters/{wildcards.model}/{adapter}.json"}
    if tuned(wildcards.engine):
        inputs["tuning_json"] = f"{RESULTS}/tuning/{wildcards.model}/{wildcards.engine}/{adapter}.json"
    return inputs


def bench_inputs(wildcards):
    return {"model_json": model_json(wildcards),
            "quant_json": f"{RESULTS}/quantize/{wildcards.model}/{wildcards.engine}.json",
            "bandwidth_json": f"{RESULTS}/hardware/bandwidth.json", **adapter_inputs(wildcards)}


def memory_inputs(wildcards):
    inputs = bench_inputs(wildcards)
    inputs.pop("bandwidth_json")
    return inputs


def stages(engine):
    return ENGINES[engine]["stages"]


def all_results():
    """Every result JSON the configured matrix asks for (the aggregate rule's input)."""
    files = []
    for model, engine, adapter in matrix():
        files += [f"{RESULTS}/{stage}/{model}/{engine}/{adapter}.json"
                  for stage in stages(engine) if stage in ("bench", "memory", "validate")]
    files += [f"{RESULTS}/tuning/{model}/{engine}/{adapter}.json"
              for model, engine, adapter in matrix() if tuned(engine)]
    files += [f"{RESULTS}/peer_check/{model}/{engine}.json" for model, spec in MODELS.items()
              for engine in spec["engines"] if "peer" in stages(engine)]
    files.append(f"{RESULTS}/hardware/bandwidth.json")
    for model, spec in MODELS.items():
        for engine in spec["engines"]:
            if "baseline" in stages(engine):
                files.append(f"{RESULTS}/bench/{model}/{engine}/baseline.json")
            if "memory" in stages(engine) and config["profile_base_memory"]:
                files.append(f"{RESULTS}/memory/{model}/{engine}/none.json")
    return sorted(set(files))


def aggregate_inputs():
    """All results of the matrix; with `report_partial`, only those that exist (a run cut short,
    e.g. by a GPU lease), the others listed as missing in the report."""
    files = all_results()
    if config["report_partial"]:
        return [f for f in files if os.path.exists(f)]
    return files


def missing_results():
    return [f for f in all_results() if not os.path.exists(f)] \
        if config["report_partial"] else []
