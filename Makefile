# Two commands do all set-up and run (see README.md):
#   make demo   install, build, run the fused ops against torch
#   make test   install with the test extras, build, run the test suite
PYTHON ?= python3

.PHONY: demo test install install-test bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

install-test:
	PYTHON=$(PYTHON) bash scripts/install.sh test

demo: install
	$(PYTHON) -m fastdiff demo

test: install-test
	$(PYTHON) -m pytest -q

bench: install-test
	$(PYTHON) -m pytest benchmarks -q --benchmark-columns=median,iqr,ops --benchmark-sort=name
