rule aggregate:
    input:
        aggregate_inputs(),
    output:
        expand(f"{RESULTS}/tables/{{table}}.csv",
               table=["bench", "overhead", "memory", "validation", "noise_floor", "coverage", "quality",
                      "decode_profile", "status"]),
    params:
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
        missing=missing_results(),
    log:
        f"{LOGS}/aggregate.log",
    benchmark:
        f"{BENCHMARKS}/aggregate.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/aggregate.py"


rule plots:
    input:
        rules.aggregate.output,
    output:
        report(
            expand(f"{RESULTS}/figures/{{figure}}.png",
                   figure=["decode_throughput", "lora_overhead", "memory_breakdown", "ttft",
                           "weight_coverage", "decode_time"]),
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        tables=lambda wildcards, input: os.path.dirname(input[0]),
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/plots.log",
    benchmark:
        f"{BENCHMARKS}/plots.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/plots.py"


rule report:
    input:
        tables=rules.aggregate.output,
        figures=rules.plots.output,
    output:
        out_md=report(f"{RESULTS}/report/report.md", caption="../report/report.rst",
                  category="Report"),
        out_html=report(f"{RESULTS}/report/index.html", caption="../report/report.rst",
                    category="Report"),
    params:
        tables=lambda wildcards, input: os.path.dirname(input.tables[0]),
        figures=lambda wildcards, input: os.path.dirname(input.figures[0]),
        preset=PRESET,
        description=config["description"],
        sources=config.get("source_reports", []),
        models=MODELS,
        engines=ENGINES,
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCHMARKS}/report.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report.py"
