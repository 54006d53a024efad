rule measure_bandwidth:
    output:
        f"{RESULTS}/hardware/bandwidth.json",
    params:
        device=config["device"],
        size_mib=lambda wc: 1024 if config["device"].startswith("cuda") else 256,
    log:
        "logs/measure_bandwidth.log",
    benchmark:
        "benchmarks/measure_bandwidth.tsv"
    resources:
        gpu=uses_gpu,
        runtime=5,
    conda:
        "../../envs/hf.yaml"
    script:
        "../scripts/measure_bandwidth.py"


rule bench_baseline:
    input:
        unpack(bench_inputs),
    output:
        f"{RESULTS}/bench/{{model}}/{{engine}}/baseline.json",
    params:
        engine_cfg=lambda wc: ENGINES[wc.engine],
        adapter=None,
        bench=config["benchmark"],
        device=config["device"],
    log:
        "logs/bench_baseline/{model}/{engine}.log",
    benchmark:
        "benchmarks/bench_baseline/{model}/{engine}.tsv"
    resources:
        gpu=uses_gpu,
        mem_mb=engine_resource("mem_mb", 32000),
        runtime=engine_resource("runtime", 60),
    conda:
        engine_env
    script:
        "../scripts/bench.py"


rule bench_lora:
    input:
        unpack(bench_inputs),
    output:
        f"{RESULTS}/bench/{{model}}/{{engine}}/{{adapter}}.json",
    params:
        engine_cfg=lambda wc: ENGINES[wc.engine],
        adapter=lambda wc: wc.adapter,
        bench=config["benchmark"],
        device=config["device"],
    log:
        "logs/bench_lora/{model}/{engine}/{adapter}.log",
    benchmark:
        "benchmarks/bench_lora/{model}/{engine}/{adapter}.tsv"
    resources:
        gpu=uses_gpu,
        mem_mb=engine_resource("mem_mb", 32000),
        runtime=engine_resource("runtime", 60),
    conda:
        engine_env
    script:
        "../scripts/bench.py"


rule profile_memory:
    input:
        unpack(memory_inputs),
    output:
        f"{RESULTS}/memory/{{model}}/{{engine}}/{{adapter}}.json",
    wildcard_constraints:
        adapter=alternation([*ADAPTERS, "none"]),
    params:
        engine_cfg=lambda wc: ENGINES[wc.engine],
        adapter=lambda wc: None if wc.adapter == "none" else wc.adapter,
        bench=config["benchmark"],
        device=config["device"],
    log:
        "logs/profile_memory/{model}/{engine}/{adapter}.log",
    benchmark:
        "benchmarks/profile_memory/{model}/{engine}/{adapter}.tsv"
    resources:
        gpu=uses_gpu,
        mem_mb=engine_resource("mem_mb", 32000),
        runtime=engine_resource("runtime", 30),
    conda:
        engine_env
    script:
        "../scripts/profile_memory.py"
