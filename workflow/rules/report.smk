from int4lora.outputs import FIGURE_CAPTIONS, FIGURES, TABLE_CAPTIONS, TABLES


rule aggregate:
    input:
        aggregate_inputs(),
    output:
        *[report(f"{RESULTS}/tables/{table}.csv", caption="../report/tables.rst",
                 category="Tables", labels={"table": table}) for table in TABLES],
        # the tables' checksums: plots and report stop on a table damaged since aggregate wrote it
        f"{RESULTS}/tables/SHA256SUMS",
    params:
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
        missing=missing_results(),
        table_captions=TABLE_CAPTIONS,
        models=MODELS,
        engines=ENGINES,
        # read, not an input: the jobs' timings, written by Snakemake beside their results
        benchmarks_dir=BENCHMARKS,
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
        # one caption per figure: each stub renders its text from FIGURE_CAPTIONS
        *[report(f"{RESULTS}/figures/{figure}.png", caption=f"../report/figures/{figure}.rst",
                 category="Figures", labels={"figure": figure}) for figure in FIGURES],
    params:
        tables=lambda wildcards, input: os.path.dirname(input[0]),
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
        captions=FIGURE_CAPTIONS,
        models=MODELS,
        engines=ENGINES,
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
