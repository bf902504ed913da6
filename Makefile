# Two commands: `make serve` (install, then serve the embedded default model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint typecheck pytest bench codex claude

$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) scripts/bootstrap.sh
	touch $(STAMP)

install: $(STAMP)

# Codex CLI (npm), a client the tests drive against /v1/responses; never committed (.peers/).
CODEX_VERSION := 0.171.0
CODEX := .peers/codex/node_modules/.bin/codex

$(CODEX):
	npm install --silent --no-audit --no-fund --prefix .peers/codex @openai/codex@$(CODEX_VERSION)

codex: $(CODEX)

# Claude Code (npm; its native binary comes in a per-platform optional npm package), a client the
# tests drive against /v1/messages; never committed (.peers/).
CLAUDE_VERSION := 2.1.332
CLAUDE := .peers/claude/node_modules/.bin/claude

$(CLAUDE):
	npm install --silent --no-audit --no-fund --prefix .peers/claude @anthropic-ai/claude-code@$(CLAUDE_VERSION)

claude: $(CLAUDE)

serve: install
	$(BIN)/gateway serve $(ARGS)

lint: install
	$(BIN)/ruff check gateway backends plugins tests bench scripts
	$(BIN)/ruff format --check gateway backends plugins tests bench scripts

typecheck: install
	$(BIN)/mypy

# The coverage gate: what the suite reached when it was set (94.7%), never lower.
COVERAGE := --cov=gateway --cov=backends --cov=plugins --cov-report=term:skip-covered --cov-fail-under=94

pytest: install codex claude
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q $(COVERAGE) $(PYTEST_ARGS)

test: lint typecheck pytest
