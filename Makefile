# code-llm-lens: every target sets up what it needs first.
#
#   make demo          the bundled demo (set-up included): runs/demo/run/report/index.html
#   make test          the test suite, in .venv built from the locked versions (constraints.txt)
#   make test-latest   the test suite against the newest releases, in a throwaway .venv-latest
#   make test-triton36 the kernel tests and the sm_90 compile under the oldest supported Triton
#   make lock          refresh constraints.txt from a green make test-latest
#   make clean         remove the virtual environments (runs/ is kept)
#
# .venv is (re)built by install.sh when it is missing or older than what defines it
# (pyproject.toml, constraints.txt, install.sh); otherwise a target does no install work.
# Extra pytest arguments: make test PYTEST_ARGS="-k triton -x".

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.codelens-installed
PYTEST_ARGS ?=

.PHONY: demo test test-latest test-triton36 lock clean

$(STAMP): pyproject.toml constraints.txt install.sh
	env -u VIRTUAL_ENV PYTHON=$(PYTHON) CODELENS_VENV=$(VENV) ./install.sh
	touch $@

# Recipes run with the environment's bin/ first on PATH, as if it were activated (the CLI tests
# start the `codelens` console script).
in_venv = env -u VIRTUAL_ENV PATH="$(CURDIR)/$(1)/bin:$$PATH"

demo: $(STAMP)
	$(call in_venv,$(VENV)) codelens demo runs/demo

# pytest's exit 5 (no test collected, e.g. a -k that matches none) is not a failing test.
test: $(STAMP)
	$(call in_venv,$(VENV)) pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Newest releases of every dependency (no lock; torch stays the machine's choice, as in install.sh).
test-latest:
	env -u VIRTUAL_ENV PYTHON=$(PYTHON) CODELENS_VENV=.venv-latest CODELENS_LATEST=1 ./install.sh
	$(call in_venv,.venv-latest) pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The oldest Triton in the supported range (kernels/dispatch.py), with the locked rest. Its CPU
# interpreter needs numpy < 2.4 (numpy 2.4 made int() of a 1-element array an error).
test-triton36:
	env -u VIRTUAL_ENV PYTHON=$(PYTHON) CODELENS_VENV=.venv-triton36 \
	  CODELENS_OVERRIDES="triton==3.6.0 numpy<2.4" ./install.sh
	$(call in_venv,.venv-triton36) pytest tests/kernels/test_lens_triton.py $(PYTEST_ARGS)
	$(call in_venv,.venv-triton36) python benchmarks/bench_kernel.py --compile-only

# The lock is the environment the suite last passed in against the newest releases.
# torch and CUDA's packages are left out: install.sh picks them for the machine.
lock: test-latest
	{ echo "# The versions the test suite passed with (make lock, $$(date -u +%F), Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'))."; \
	  echo "# install.sh installs with these; torch is chosen per machine there. Refresh: make lock."; \
	  .venv-latest/bin/python -m pip freeze --exclude-editable \
	    | grep -v -i -E '^(torch|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)(==| @)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	@echo "make lock: constraints.txt rewritten; review 'git diff constraints.txt' and commit it"

clean:
	rm -rf $(VENV) .venv-latest .venv-triton36
