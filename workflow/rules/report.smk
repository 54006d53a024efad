rule aggregate:
    input:
        aggregate_inputs(),
    output:
        expand(f"{RESULTS}/tables/{{table}}.csv",
               table=["bench", "overhead", "memory", "validation", "coverage", "quality",
                      "decode_profile", "status"]),
    params:
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
        missing=missing_results(),
    log:
        "logs/aggregate.log",
    benchmark:
        "benchmarks/aggregate.tsv"
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
        "logs/plots.log",
    benchmark:
        "benchmarks/plots.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/plots.py"


rule report:
    input:
        tables=rules.aggregate.output,
        figures=rules.plots.output,
    output:
        md=report(f"{RESULTS}/report/report.md", caption="../report/report.rst",
                  category="Report"),
        html=report(f"{RESULTS}/report/index.html", caption="../report/report.rst",
                    category="Report"),
    params:
        tables=lambda wildcards, input: os.path.dirname(input.tables[0]),
        figures=lambda wildcards, input: os.path.dirname(input.figures[0]),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report.py"
