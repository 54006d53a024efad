# Timed rules (measure_bandwidth, bench_*, profile_memory) take every core Snakemake has, so that no
# other job runs beside them and their numbers are not another job's contention.


rule measure_bandwidth:
    output:
        f"{RESULTS}/hardware/bandwidth.json",
    params:
        device=config["device"],
        size_mib=lambda wc: 1024 if config["device"].startswith("cuda") else 256,
    log:
        f"{LOGS}/measure_bandwidth.log",
    benchmark:
        f"{BENCHMARKS}/measure_bandwidth.tsv"
    threads: ALL_CORES
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
        plan=plan(adapter_from_wildcards=False),
        bench_cfg=config["benchmark"],
        device=config["device"],
    log:
        f"{LOGS}/bench_baseline/{{model}}/{{engine}}.log",
    benchmark:
        f"{BENCHMARKS}/bench_baseline/{{model}}/{{engine}}.tsv"
    threads: ALL_CORES
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
        plan=plan(adapter_from_wildcards=True),
        bench_cfg=config["benchmark"],
        device=config["device"],
    log:
        f"{LOGS}/bench_lora/{{model}}/{{engine}}/{{adapter}}.log",
    benchmark:
        f"{BENCHMARKS}/bench_lora/{{model}}/{{engine}}/{{adapter}}.tsv"
    threads: ALL_CORES
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
        plan=plan(adapter_from_wildcards=True),
        bench_cfg=config["benchmark"],
        device=config["device"],
    log:
        f"{LOGS}/profile_memory/{{model}}/{{engine}}/{{adapter}}.log",
    benchmark:
        f"{BENCHMARKS}/profile_memory/{{model}}/{{engine}}/{{adapter}}.tsv"
    threads: ALL_CORES
    resources:
        gpu=uses_gpu,
        mem_mb=engine_resource("mem_mb", 32000),
        runtime=engine_resource("runtime", 30),
    conda:
        engine_env
    script:
        "../scripts/profile_memory.py"
