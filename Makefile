# Two entry points: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
NOODLE := $(VENV)/bin/noodle

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build on the dev/CI path; pyproject keeps a range.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(NOODLE) solve specs/gpt2-home-lab.yaml --out out/plan.json
	$(NOODLE) plot out/plan.json --out out/plan.png

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out runs models
