# The two commands of the README: `make demo` (the main job end to end) and `make test` (the whole suite but the
# timing checks, what CI runs). Test tiers, by pytest marker (pyproject.toml):
#   make test        everything not marked perf: correctness only, no assertion depends on the machine's speed
#   make test-fast   the developers' quick tier: neither slow (processes, training, GRAPH compiling) nor perf
#   make perf-check  only the perf tests: wall-clock bounds, speed, bandwidth and peak ratios; run them on a quiet
#                    machine (a shared one moves the figures). No perf test collected (pytest's exit status 5, e.g.
#                    under a PYTEST_ADDOPTS="-k ..." that matches none) counts as a pass: there is nothing to check.
# test and test-fast run in TEST_WORKERS pytest-xdist workers (default 2), a test file each at a time: the suite is
# mostly single-threaded work (GRAPH compiles, process start-ups), so two workers take it from ~19 to ~10 minutes on
# a 2-core machine. TEST_WORKERS=0 runs in one process. perf-check always runs in one process (timing).
# DEMO_ARGS passes options to example/demo.py (e.g. DEMO_ARGS="--output_dir /tmp/demo").
# Each target creates .venv first when it is missing or when requirements.txt / pyproject.toml changed.
VENV_STAMP := .venv/.installed
PY := .venv/bin/python
TEST_WORKERS ?= 2
WORKERS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: demo test test-fast perf-check setup venv-ms210
setup: $(VENV_STAMP)

# The second tested MindSpore: .venv-ms210 with mindspore 2.10.0 (README, "Tested MindSpore versions"); not part of
# `make test`. Then: .venv-ms210/bin/python -m pytest tests -m "not slow and not perf" -n 2 --dist loadfile
venv-ms210: $(VENV_STAMP)
	bash scripts/setup_venv_ms210.sh

$(VENV_STAMP): requirements.txt pyproject.toml scripts/setup_env.sh tools/parity/requirements.txt
	bash scripts/setup_env.sh

demo: $(VENV_STAMP)
	$(PY) example/demo.py $(DEMO_ARGS)

test: $(VENV_STAMP)
	$(PY) -m pytest tests -m "not perf" $(WORKERS)

test-fast: $(VENV_STAMP)
	$(PY) -m pytest tests -m "not slow and not perf" $(WORKERS)

perf-check: $(VENV_STAMP)
	$(PY) -m pytest tests -m perf; status=$$?; \
	if [ $$status -eq 5 ]; then echo "perf-check: no perf tests collected"; status=0; fi; exit $$status
