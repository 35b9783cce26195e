# Two commands do all set-up and run (see README.md):
#   make sample  install, build, draw digits from the shipped model into digits.png
#   make test    install with the test extras, build, run the test suite
# Also: make demo (the fused ops against torch), make bench (the benchmark suite).
PYTHON ?= python3

.PHONY: sample demo test install install-test bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

install-test:
	PYTHON=$(PYTHON) bash scripts/install.sh test

sample: install
	$(PYTHON) -m fastdiff sample --out digits.png

demo: install
	$(PYTHON) -m fastdiff demo

test: install-test
	$(PYTHON) -m pytest -q

bench: install-test
	$(PYTHON) -m fastdiff bench --out bench-results
