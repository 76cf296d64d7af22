# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch is installed only when the venv has no torch at all.
# GPU users: `make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>" install`, or install torch first.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Extra requirement installed with the package: `make test-tl3` sets it to the newest TransformerLens 3.x.
TL_SPEC ?=

.PHONY: venv install install-dev demo test test-e2e test-slow test-tl3 test-all lint bench bench-byom bench-scale bench-sweep battery study browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e . $(if $(TL_SPEC),'$(TL_SPEC)')
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[dev,ray]" $(if $(TL_SPEC),'$(TL_SPEC)')
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/ih-circuits demo

# The fast tier: tests/ and the doctests in ih_circuits/, without the e2e and slow tests; .ci/run calls it first.
test: install-dev
	$(PY) -m pytest -q -m "not slow and not e2e" $(PYTEST_ARGS)

# The end-to-end tier (marked e2e): every notebook with its key outputs checked, examples, the browser test,
# multi-process sweeps and kills; .ci/run calls it after `make test`.
test-e2e: install-dev
	$(PY) -m pytest -q -m "e2e and not slow" $(PYTEST_ARGS)

# The runs marked slow (trained ordinary transformers, presets); .ci/run calls it after `make test-e2e`.
test-slow: install-dev
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The fast and end-to-end tiers again on TransformerLens 3.x (which still has HookedTransformer), in its own venv.
test-tl3:
	$(MAKE) VENV=.venv-tl3 TL_SPEC="transformer-lens>=3.0,<4" test test-e2e

# Everything in one run: the fast tier, the e2e tier with the notebooks, and the slow tests.
test-all: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_probes.py
	-$(PY) benchmarks/bench_byom.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_sweep.py

# The probes' cost on a GPT-2-small-shaped model: forwards of the batch and peak memory against one forward (about 1 min).
bench-byom: install
	$(PY) benchmarks/bench_byom.py

# The example sweep (examples/sweep.toml, 24 runs) with 1 and 2 local workers and on a local Ray instance (about 2 min).
bench-sweep: install-dev
	$(PY) benchmarks/bench_sweep.py --ray

# Cost and peak memory as T and d grow, the every-position targets, training and theory at scale (about 2 min on a quiet machine, 6 under load).
bench-scale: install
	$(PY) benchmarks/bench_scale.py

# The study "Where the theory holds" (examples/theory_limits.toml, 20 runs, about 25 min on 2 cores): its README tables.
study: install
	$(PY) examples/theory_limits.py out/theory_limits

# Bad inputs, extreme values, damaged files and kills, each in a forked child; prints the totals (about 5 min).
battery: install
	$(PY) benchmarks/battery.py

# Debian's chromium, for the test that opens the HTML report in a headless browser (needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

clean:
	rm -rf $(VENV) .venv-tl3 .pytest_cache .ruff_cache *.egg-info
