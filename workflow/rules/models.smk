rule fetch_model:
    output:
        f"{RESULTS}/models/{{model}}.json",
    params:
        spec=lambda wc: MODELS[wc.model],
        cache_dir=config["cache_dir"],
        device=config["device"],
    log:
        f"{LOGS}/fetch_model/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/fetch_model/{{model}}.tsv"
    resources:
        gpu=uses_gpu,
        mem_mb=16000,
        runtime=60,
    conda:
        "../../envs/hf.yaml"
    script:
        "../scripts/fetch_model.py"


rule quantize:
    input:
        model_json=model_json,
    output:
        f"{RESULTS}/quantize/{{model}}/{{engine}}.json",
    params:
        engine_cfg=lambda wc: ENGINES[wc.engine],
        cache_dir=config["cache_dir"],
    log:
        f"{LOGS}/quantize/{{model}}/{{engine}}.log",
    benchmark:
        f"{BENCHMARKS}/quantize/{{model}}/{{engine}}.tsv"
    threads: ALL_CORES
    resources:
        gpu=uses_gpu,
        mem_mb=64000,
        runtime=120,
    conda:
        "../../envs/quantize.yaml"
    script:
        "../scripts/quantize.py"


rule make_adapter:
    input:
        model_json=model_json,
    output:
        f"{RESULTS}/adapters/{{model}}/{{adapter}}.json",
    params:
        spec=lambda wc: ADAPTERS[wc.adapter],
        cache_dir=config["cache_dir"],
    log:
        f"{LOGS}/make_adapter/{{model}}/{{adapter}}.log",
    benchmark:
        f"{BENCHMARKS}/make_adapter/{{model}}/{{adapter}}.tsv"
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/hf.yaml"
    script:
        "../scripts/make_adapter.py"
