# int4-lora-bench: validate and benchmark INT4 + LoRA inference (HF NF4 + PEFT, vLLM W4A16 + LoRA).
# Default config is the GPU matrix; the offline CPU demo is `--configfile config/offline-cpu.yaml`.

# A --configfile on the command line replaces config.yaml instead of merging into it, so
# that a preset never inherits the GPU matrix's models.
if not workflow.overwrite_configfiles:
    # Snakemake's own message for a YAML error names neither the file nor the line; a
    # --configfile is read before this file runs (tools/run.py checks those).
    sys.path.insert(0, os.path.join(workflow.basedir, "tools"))
    from configcheck import exit_if_bad

    exit_if_bad("config.yaml")

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        # the result JSONs are targets too, so that a deleted one is rebuilt (with what
        # depends on it) instead of being taken as an intermediate that is no longer needed
        aggregate_inputs(),
        f"{RESULTS}/report/report.md",
        f"{RESULTS}/report/index.html",
    default_target: True
