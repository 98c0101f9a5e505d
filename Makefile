# Set-up and entry points. `make demo` and `make test` each create .venv and install HistCode first
# (pinned versions from pyproject.toml and constraints.txt; about 3.5 minutes and 7 GB the first time).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
# mkdocs 1.6 announces MkDocs 2 on every build; the site pins 1.6
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup demo test test-all bench docs serve mlflow-ui services services-down clean-demo

# The browser tests drive the distribution's Chromium (Playwright's own browser download is not used); it is
# installed when missing (scripts/install_chromium.sh: apt-get as root or through sudo).
CHROMIUM ?= /usr/bin/chromium

$(STAMP): pyproject.toml constraints.txt
	scripts/install_chromium.sh $(CHROMIUM)
	scripts/install_postgres.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,viewer,foundation,polars,server,docs,exchange,dicom]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/histcode demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

bench: $(STAMP)
	$(BIN)/python benchmarks/tiling.py

# The documentation site (mkdocs.yml, docs/) into site/: offline, nothing fetched; --strict fails on any warning
# (a broken link or anchor, a page missing from the nav, an API name that does not resolve).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict -d site

# A local Prefect server (UI on http://127.0.0.1:4200), the work pool, prefect.yaml's deployments and a worker;
# flow runs use $(HISTCODE_HOME) when set (else this checkout); logs in the workspace's outputs/logs/.
serve: $(STAMP)
	$(BIN)/histcode serve

# The MLflow UI over the workspace's store ($(HISTCODE_HOME) when set), on http://127.0.0.1:5000, with links
# straight to the training runs of each experiment.
mlflow-ui: $(STAMP)
	$(BIN)/histcode mlflow-ui

# The shared set-up of a lab on this machine (PostgreSQL, S3, MLflow and Prefect servers, Dask): prints the
# variables to export; `make services-down` stops it. See docs/scaling.md, "Shared services".
services: $(STAMP)
	$(BIN)/histcode services up

services-down: $(STAMP)
	$(BIN)/histcode services down

clean-demo:
	rm -rf data/demo data/catalog.duckdb data/lancedb data/labels outputs metrics mlruns/mlflow.db mlruns/artifacts
