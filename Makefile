# The two commands a newcomer runs: `make demo` and `make test`. Both set themselves up.
BUILD      ?= build
BUILD_SAN  ?= build-sanitize
PYTHON     ?= python3
JOBS       ?= $(shell nproc)
CMAKE_ARGS ?=

.PHONY: all deps build test test-cpp test-sanitize test-portable test-python python demo demo-engine bench clean

all: build

deps:
	scripts/install-deps

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)
	cmake --build $(BUILD) -j $(JOBS)

# GPU tests (label "gpu") run through scripts/gpu-check on a machine with an NVIDIA GPU.
test-cpp: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS) -LE gpu

# The C++ suite again under AddressSanitizer and UndefinedBehaviorSanitizer (CPU backend only).
test-sanitize: deps
	cmake -S . -B $(BUILD_SAN) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPATTN_CUDA=OFF \
	  -DSPATTN_SANITIZE=address,undefined -DSPATTN_BENCH=OFF -DSPATTN_TOOLS=OFF
	cmake --build $(BUILD_SAN) -j $(JOBS)
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --test-dir $(BUILD_SAN) --output-on-failure -j $(JOBS)

# The Python package. The CUDA backend is compiled into it only where a GPU is present (or
# when the caller sets CMAKE_ARGS): on a CPU-only machine it would be built and never run.
PY_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo ON || echo OFF)
python: deps
	CMAKE_ARGS="$(or $(CMAKE_ARGS),-DSPATTN_CUDA=$(PY_CUDA))" $(PYTHON) -m pip install --no-build-isolation -q .

# Then its pytest suite. Any non-zero pytest exit fails the target, including 5 (no tests).
test-python: python
	$(PYTHON) -m pytest tests/python -q

# The CPU engine built without -march=native (baseline x86-64, no AVX-512): its portable loops.
BUILD_PORTABLE ?= build-portable
test-portable: deps
	cmake -S . -B $(BUILD_PORTABLE) -DCMAKE_BUILD_TYPE=Release -DSPATTN_NATIVE=OFF -DSPATTN_CUDA=OFF \
	  -DSPATTN_BENCH=OFF -DSPATTN_TOOLS=OFF
	cmake --build $(BUILD_PORTABLE) -j $(JOBS) --target test_attention
	ctest --test-dir $(BUILD_PORTABLE) --output-on-failure -j $(JOBS) -R "Cpu|Validation"

test: test-cpp test-sanitize test-portable test-python

# The main job: sparse attention on a small video DiT, end to end (teacher, calibrated masks,
# training-free vs diffusion-loss vs velocity distillation); writes build/demo/.
demo: python
	$(PYTHON) -m spattn.demo

# The C++ engine alone: dense vs block-sparse plans on one problem, time / density / error.
demo-engine: build
	$(BUILD)/bench/spattn_demo

bench: build
	$(BUILD)/bench/bench_attention

clean:
	rm -rf $(BUILD) $(BUILD_SAN) $(BUILD_PORTABLE)
