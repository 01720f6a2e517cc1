# Two entry points, each of which sets itself up from a fresh clone:
#   make demo   the main job: the scheduled vq-pipeline flow, once, on generated data (embedded Prefect API)
#   make test   run the fast test suite (a few minutes)
#   make test-slow  the slow end-to-end tests (served deployment, Dask, kill -9 loops, the GPU dry run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned and installed first: on a CPU machine this takes the CPU wheel, and the
# project's own `torch>=...` requirement is then already satisfied (no multi-GB CUDA download).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

export VQ_KEOPS_CACHE_DIR ?= $(CURDIR)/.cache/keops
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: demo test test-slow docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[plot]"
	touch $(STAMP)

# The test suite needs every extra (dask, sklearn, plot) and the test tools.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m vq_flows.demo

test: $(TEST_STAMP)
	$(PY) -m ruff check vq_pipeline flows tests
	$(PY) -m ruff format --check vq_pipeline flows
	$(PY) -m pytest -m "not slow"

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -m slow

docs: $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	$(PY) -m mkdocs build --strict --site-dir .cache/site

clean:
	rm -rf $(VENV) .cache .pytest_cache vq_demo_output
