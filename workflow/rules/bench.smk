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


rule tune_lora_kernels:
    input:
        model_json=model_json,
    output:
        f"{RESULTS}/tuning/{{model}}/{{engine}}/{{adapter}}.json",
    params:
        plan=plan(adapter_from_wildcards=True),
        bench_cfg=config["benchmark"],
        cache_dir=config["cache_dir"],
        device=config["device"],
    log:
        f"{LOGS}/tune_lora_kernels/{{model}}/{{engine}}/{{adapter}}.log",
    benchmark:
        f"{BENCHMARKS}/tune_lora_kernels/{{model}}/{{engine}}/{{adapter}}.tsv"
    threads: ALL_CORES
    resources:
        gpu=uses_gpu,
        runtime=15,
    conda:
        "../../envs/vllm.yaml"
    script:
        "../scripts/tune_lora_kernels.py"


rule peer_check:
    input:
        quant_json=f"{RESULTS}/quantize/{{model}}/{{engine}}.json",
        bench_json=f"{RESULTS}/bench/{{model}}/{{engine}}/baseline.json",
    output:
        f"{RESULTS}/peer_check/{{model}}/{{engine}}.json",
    params:
        plan=plan(adapter_from_wildcards=False),
        bench_cfg=config["benchmark"],
        batches=config["benchmark"]["peer_batch_sizes"],
        device=config["device"],
    log:
        f"{LOGS}/peer_check/{{model}}/{{engine}}.log",
    benchmark:
        f"{BENCHMARKS}/peer_check/{{model}}/{{engine}}.tsv"
    threads: ALL_CORES
    resources:
        gpu=uses_gpu,
        mem_mb=engine_resource("mem_mb", 32000),
        runtime=engine_resource("runtime", 30),
    conda:
        "../../envs/vllm.yaml"
    script:
        "../scripts/peer_check.py"
