# qtool's front door. Every target sets up what it needs from nothing: a virtual env in .venv,
# torch==2.13.0 first (a CPU build; an unpinned torch pulls gigabytes of CUDA packages), then
# qtool with its dev extras (llama-cpp-python is built from source: ~6 min the first time).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Test workers (pytest-xdist): one per core, at most 4 (each holds a model or two in memory).
# The suite's time is half single-threaded (imports, subprocess starts, numba, file I/O), so
# two workers on two cores take it from ~19 to ~9 minutes. TEST_WORKERS=0: one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install assets assets-gemma demo test test-slow check bench bench-quantize bench-peers bench-dist bench-scale bench-floor clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Offline real assets (SmolLM2-135M, Canterbury texts) into ~/.cache/qtool/assets.
assets: install
	$(PY) scripts/assets.py

# Also Gemma 3 270M (benchmarks and the heavier checks).
assets-gemma: install
	$(PY) scripts/assets.py --gemma

# The pipeline on SmolLM2-135M: inspect, quantize to Q4_K_M, evaluate against the base.
demo: assets
	@mkdir -p out
	$(VENV)/bin/qtool inspect "$$($(PY) scripts/assets.py --path smollm2_hf)" --context 4096
	$(VENV)/bin/qtool quantize "$$($(PY) scripts/assets.py --path smollm2_hf)" --method kquant \
		--type Q4_K_M -o out/smollm2-q4km.gguf
	$(VENV)/bin/qtool eval out/smollm2-q4km.gguf --base "$$($(PY) scripts/assets.py --path smollm2_hf)" \
		--dataset canterbury:plrabn12.txt --ctx 256 --chunks 4

# The default suite (CI runs this). Heavier checks: make test-slow.
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

test-slow: install
	QTOOL_TEST_GEMMA=1 $(PY) -m pytest -m slow $(PYTEST_ARGS)

check: install
	$(VENV)/bin/ruff check qtool kernels tests scripts
	$(VENV)/bin/ruff format --check qtool kernels tests scripts
	$(VENV)/bin/mypy

bench: assets-gemma
	$(PY) scripts/bench_codecs.py
	$(PY) scripts/bench_export.py --gemma
	$(PY) scripts/bench_eval.py

# FP / RTN / GPTQ quality table and GPTQ time + peak RSS (about 40 min for SmolLM2 on 2 cores,
# 20 more for Gemma 3 at 4 and 3 bits).
bench-quantize: assets-gemma
	$(PY) scripts/bench_quantize.py --out bench-quantize-smollm2.json
	$(PY) scripts/bench_quantize.py --model gemma3 --bits 4 3 --clip none --out bench-quantize-gemma3.json

# qtool's GPTQ against llm-compressor's (oneshot GPTQModifier) on SmolLM2-135M, same settings,
# one run. llm-compressor goes into its own venv (~/.cache/qtool/bench-peers-venv, made by the
# script). BENCH_PEERS_ARGS=--quick: 16 x 256 calibration tokens.
BENCH_PEERS_ARGS ?=
bench-peers: assets
	$(PY) scripts/bench_peers.py $(BENCH_PEERS_ARGS) --out bench-peers-smollm2.json

# --nproc 2 (two gloo processes) against one process on the CPU: GPTQ and calibration on
# SmolLM2-135M, speed-up and byte equality of the outputs, one run. BENCH_DIST_ARGS=--quick.
BENCH_DIST_ARGS ?=
bench-dist: assets
	$(PY) scripts/bench_dist.py $(BENCH_DIST_ARGS) --out bench-dist-smollm2.json

# GPTQ time per layer and peak memory at Llama-3.2-1B / Llama-3.1-8B widths (random weights,
# 1 and 3 layers), extrapolated to full depth. On a GPU: BENCH_SCALE_ARGS="--device cuda
# --samples 128 --seq-len 2048".
BENCH_SCALE_ARGS ?=
bench-scale: assets
	$(PY) scripts/bench_scale.py $(BENCH_SCALE_ARGS) --out bench-scale.json

# GPTQ's compute floor here (one forward of every layer + the Hessian products over the
# calibration tokens, timed on SmolLM2-135M's own layer) against a real 128 x 512 run.
BENCH_FLOOR_ARGS ?=
bench-floor: assets
	$(PY) scripts/bench_floor.py --run $(BENCH_FLOOR_ARGS) --out bench-floor-smollm2.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
