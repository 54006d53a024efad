"""Config validation, wildcard constraints and input functions (no logic in the rules)."""
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))

validate(config, schema="../schemas/config.schema.json")

RESULTS = "results"
MODELS = config["models"]
if config.get("only_models"):
    # run a subset of the matrix (e.g. one model per GPU lease); the report covers that subset
    unknown = sorted(set(config["only_models"]) - set(MODELS))
    if unknown:
        raise ValueError(f"only_models: unknown model(s) {unknown} (configured: {', '.join(MODELS)})")
    MODELS = {name: MODELS[name] for name in config["only_models"]}
ENGINES = config["engines"]
ADAPTERS = config["adapters"]


def _check_matrix():
    """Cross-references the JSON schema cannot express; each error names the bad value."""
    from int4lora.engines.vllm_engine import ALLOWED_MAX_LORA_RANKS

    errors = []
    for name, spec in MODELS.items():
        for engine in spec["engines"]:
            if engine not in ENGINES:
                errors.append(f"models.{name}.engines: unknown engine {engine!r} "
                              f"(configured: {', '.join(ENGINES)})")
        for adapter in spec["adapters"]:
            if adapter not in ADAPTERS:
                errors.append(f"models.{name}.adapters: unknown adapter {adapter!r} "
                              f"(configured: {', '.join(ADAPTERS)})")
            elif ADAPTERS[adapter].get("moe_only") and not (spec.get("arch") or {}).get(
                    "num_local_experts", spec.get("source") != "synthetic"):
                errors.append(f"models.{name}.adapters: adapter {adapter!r} targets MoE "
                              f"experts but {name!r} is not a MoE model")
            elif any(ENGINES.get(e, {}).get("backend") == "vllm" for e in spec["engines"]) \
                    and ADAPTERS[adapter]["rank"] > max(ALLOWED_MAX_LORA_RANKS):
                errors.append(f"adapters.{adapter}.rank={ADAPTERS[adapter]['rank']} is above "
                              f"vLLM's limit {max(ALLOWED_MAX_LORA_RANKS)} (model {name!r})")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


_check_matrix()


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


def matrix():
    """(model, engine, adapter) triples of the configured matrix."""
    for model, spec in MODELS.items():
        for engine in spec["engines"]:
            for adapter in spec["adapters"]:
                yield model, engine, adapter


def model_json(wildcards):
    return f"{RESULTS}/models/{wildcards.model}.json"


def bench_inputs(wildcards):
    inputs = {"model": model_json(wildcards),
              "quant": f"{RESULTS}/quantize/{wildcards.model}/{wildcards.engine}.json",
              "bandwidth": f"{RESULTS}/hardware/bandwidth.json"}
    if getattr(wildcards, "adapter", "none") != "none":
        inputs["adapter"] = f"{RESULTS}/adapters/{wildcards.model}/{wildcards.adapter}.json"
    return inputs


def memory_inputs(wildcards):
    inputs = bench_inputs(wildcards)
    inputs.pop("bandwidth")
    return inputs


def stages(engine):
    return ENGINES[engine].get("stages", ["bench", "memory", "validate"])


def all_results():
    """Every result JSON the configured matrix asks for (the aggregate rule's input)."""
    files = []
    for model, engine, adapter in matrix():
        files += [f"{RESULTS}/{stage}/{model}/{engine}/{adapter}.json"
                  for stage in stages(engine)]
    for model, spec in MODELS.items():
        for engine in spec["engines"]:
            files.append(f"{RESULTS}/bench/{model}/{engine}/baseline.json")
            if "memory" in stages(engine) and config.get("profile_base_memory", True):
                files.append(f"{RESULTS}/memory/{model}/{engine}/none.json")
    return sorted(set(files))


def aggregate_inputs():
    """All results of the matrix; with `report_partial`, only those that exist (a run cut short,
    e.g. by a GPU lease), the others listed as missing in the report."""
    files = all_results()
    if config.get("report_partial"):
        return [f for f in files if os.path.exists(f)]
    return files


def missing_results():
    return [f for f in all_results() if not os.path.exists(f)] \
        if config.get("report_partial") else []
