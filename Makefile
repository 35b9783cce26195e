# Two commands do all set-up and run (see README.md):
#   make sample  install, build, draw digits from the shipped model into digits.png
#   make test    install with the test extras, build, run the test suite
# Also: make demo (the fused ops against torch), make bench (the benchmark suite), make roofline
#       (a model of where a U-Net step's GPU time goes),
#       make wheel (dist/*.whl with the prebuilt kernels: cubins), make prebuilt (the same cubins
#       into the source tree, for an editable install on a GPU machine; `make cubins` is an older
#       name), make sass-table (BENCHMARKS.md's table of registers, shared memory, spills and load
#       widths of every kernel family).
PYTHON ?= python3

.PHONY: sample demo test install install-test bench roofline wheel prebuilt cubins sass-table

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

install-test:
	PYTHON=$(PYTHON) bash scripts/install.sh test

sample: install
	$(PYTHON) -m fastdiff sample --out digits.png

demo: install
	$(PYTHON) -m fastdiff demo

# The suite in TEST_JOBS processes (pytest-xdist), a test file per process at a time (module
# fixtures, such as the ahead-of-time compiles, run once; tests/conftest.py's groups);
# TEST_JOBS=0 runs it in one.
TEST_JOBS ?= 2
test: install-test
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadgroup

bench: install-test
	$(PYTHON) benchmarks/run.py --out bench-results

# A roofline model of one U-Net step (SD1.5, SDXL, DDPM-CIFAR10; diffusers, accelerate, engine)
# on meta tensors: kernels, FLOPs, bytes, floor times on H100/H200. No GPU; under a minute.
roofline: install-test
	$(PYTHON) benchmarks/roofline.py

# Both compile for FASTDIFF_CUDA_ARCHS (default 80,86,89,90).
wheel: install
	$(PYTHON) -m pip wheel --no-build-isolation --no-deps . -w dist/

prebuilt: install
	env -u TRITON_INTERPRET $(PYTHON) -m fastdiff.kernels.prebuild --emit kernels/cubins \
	  --jobs $$(nproc) --archs-from-env > /dev/null

cubins: prebuilt

sass-table: install
	env -u TRITON_INTERPRET $(PYTHON) scripts/sass_table.py --write BENCHMARKS.md --jobs $$(nproc)
