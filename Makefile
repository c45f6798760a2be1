# `make test` and `make demo` do their whole set-up: a virtual environment in .venv/, PyTorch
# (the CPU build pinned below when no torch is importable; a torch you already have is kept),
# and this package in editable mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench bench-posterior clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/cleanprior demo

bench: setup
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_operators.py
	$(PY) benchmarks/bench_speed.py --threads 1

# The posterior benchmark runs azula (the DiEM authors' reference code) side by side; --no-deps
# keeps pip from replacing torch or pulling torchvision.
bench-posterior: setup
	$(PY) -m pip install -q --no-deps azula einops
	$(PY) benchmarks/bench_posterior.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
