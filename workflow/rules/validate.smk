rule validate:
    input:
        unpack(adapter_inputs),
        model_json=model_json,
        quant_json=f"{RESULTS}/quantize/{{model}}/{{engine}}.json",
    output:
        f"{RESULTS}/validate/{{model}}/{{engine}}/{{adapter}}.json",
    params:
        plan=plan(adapter_from_wildcards=True),
        val_cfg=config["validation"],
        cache_dir=config["cache_dir"],
        device=config["device"],
    log:
        f"{LOGS}/validate/{{model}}/{{engine}}/{{adapter}}.log",
    benchmark:
        f"{BENCHMARKS}/validate/{{model}}/{{engine}}/{{adapter}}.tsv"
    threads: ALL_CORES
    resources:
        gpu=uses_gpu,
        mem_mb=engine_resource("mem_mb", 32000),
        runtime=engine_resource("runtime", 60),
    conda:
        engine_env
    script:
        "../scripts/validate.py"
