# robustclip: `make test` and `make demo` set everything up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch and torchvision must come as a matching pair; these lie on this
# project's machines' disk (no download). Override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: test demo install bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m robustclip demo

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/harness_overhead.py
	$(PY) bench/standard_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
