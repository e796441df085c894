# Everything installs into a local virtual environment. torch 2.13.0 (CPU) is installed first:
# a bare `torch` requirement with nothing installed would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.infopt-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install demo test bench fuzz clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e '.[test]'  # no setuptools banners
	touch $(STAMP)

demo: install
	$(BIN)/infopt demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/run.py

fuzz: install  # thousands of malformed inputs and the fault tests; writes BENCHMARKS.md's reliability section
	INFOPT_FUZZ_SCALE=$${INFOPT_FUZZ_SCALE:-10} $(BIN)/python benchmarks/run.py --only reliability

clean:
	rm -rf out .pytest_cache
