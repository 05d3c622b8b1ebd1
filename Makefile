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
	touch $@

install: $(BIN)/llmserve

serve: install
	$(BIN)/llmserve serve --config $(CONFIG)

# pytest exits 5 when it collects no tests: say so, and do not count it as a failure.
test: install
	$(BIN)/python -m pytest -q tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$status

clean:
	rm -rf $(VENV) *.egg-info
