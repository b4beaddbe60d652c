# The two commands of the README: `make demo` (the main job end to end) and `make test` (the whole suite, what CI
# runs). `make test-fast` is the developers' quick tier: the tests not marked slow (no processes, training or
# GRAPH compiling).
# DEMO_ARGS passes options to example/demo.py (e.g. DEMO_ARGS="--output_dir /tmp/demo").
# Both create .venv first when it is missing or when requirements.txt / pyproject.toml changed.
VENV_STAMP := .venv/.installed
PY := .venv/bin/python

.PHONY: demo test test-fast setup
setup: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh

demo: $(VENV_STAMP)
	$(PY) example/demo.py $(DEMO_ARGS)

test: $(VENV_STAMP)
	$(PY) -m pytest tests

test-fast: $(VENV_STAMP)
	$(PY) -m pytest tests -m "not slow"
