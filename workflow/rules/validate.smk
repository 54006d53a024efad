rule validate:
    input:
        model=model_json,
        quant=f"{RESULTS}/quantize/{{model}}/{{engine}}.json",
        adapter=f"{RESULTS}/adapters/{{model}}/{{adapter}}.json",
    output:
        f"{RESULTS}/validate/{{model}}/{{engine}}/{{adapter}}.json",
    params:
        engine_cfg=lambda wc: ENGINES[wc.engine],
        validation=config["validation"],
        device=config["device"],
    log:
        "logs/validate/{model}/{engine}/{adapter}.log",
    benchmark:
        "benchmarks/validate/{model}/{engine}/{adapter}.tsv"
    resources:
        gpu=uses_gpu,
        mem_mb=engine_resource("mem_mb", 32000),
        runtime=engine_resource("runtime", 60),
    conda:
        engine_env
    script:
        "../scripts/validate.py"
