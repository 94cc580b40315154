# `make test` builds .venv from nothing, then runs the suite; `make demo` runs the main job.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The newest torchvision whose Python side imports against the CPU torch wheel (README,
# "torch and torchvision on a CPU machine"). Installed only where torch is a CPU build.
CPU_TORCHVISION := torchvision==0.16.2
PYTEST_ARGS ?= -q

.PHONY: install test lint demo

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints/cpu.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints/cpu.txt -e '.[dev,wsi,slurm]'
	if $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(PIP) install -q --no-deps --force-reinstall $(CPU_TORCHVISION) && $(PIP) install -q requests; fi
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc; }

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(VENV)/bin/dinov2-patho demo --output-dir runs/demo
