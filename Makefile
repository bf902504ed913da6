# Two commands: `make serve` (install, then serve the embedded default model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint typecheck pytest bench

$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) scripts/bootstrap.sh
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/gateway serve $(ARGS)

lint: install
	$(BIN)/ruff check gateway backends plugins tests bench scripts
	$(BIN)/ruff format --check gateway backends plugins tests bench scripts

typecheck: install
	$(BIN)/mypy

pytest: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest
