# Two entry points: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
NOODLE := $(VENV)/bin/noodle

.PHONY: setup demo demo-plan test bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build on the dev/CI path; pyproject keeps a range.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[exec,dev]'
	touch $@

# The whole loop on GPT-2 small (random weights): init, profile, solve, plot, execute.
# Profile and run with the same thread count, so planned and measured latencies compare.
demo: setup out/models/gpt2/config.json
	$(NOODLE) profile --model out/models/gpt2 --out out/profile/gpt2 --iterations 20 --warmup 3 --threads 1
	$(NOODLE) solve specs/gpt2-profiled.yaml --out out/plan.json
	$(NOODLE) plot out/plan.json --out out/plan.png
	$(NOODLE) exec out/plan.json --model out/models/gpt2 --emulate --threads 1 \
		--prompt "The planner measures every layer and" --max-new-tokens 16

out/models/gpt2/config.json: | setup
	$(NOODLE) model init --preset gpt2 --out out/models/gpt2

# Planning only, in seconds: the analytic GPT-2 profile on the home lab.
demo-plan: setup
	$(NOODLE) solve specs/gpt2-home-lab.yaml --out out/plan-analytic.json
	$(NOODLE) plot out/plan-analytic.json --out out/plan-analytic.png

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out runs models
