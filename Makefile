# inferd: the two set-up commands of the README, and a few helpers.
#
#   make run    fetch the default model, build (release), start the daemon
#   make test   fetch the models, build every binary, run the whole test suite
#   make python-test   the Python client's pytest tier alone (needs the debug binaries)

MODEL_DIR ?= $(or $(INFERD_MODEL_DIR),$(HOME)/.cache/inferd/models)
MODEL     ?= $(MODEL_DIR)/all-MiniLM-L6-v2/model.onnx
SOCKET    ?= /tmp/inferd.sock
WORKERS   ?= 2
# Extra inferd flags, e.g. make run RUN_ARGS="--soft-limit 400MiB --hard-limit 600MiB"
RUN_ARGS  ?=

.PHONY: model build run test python-venv python-test bench clean

model:
	scripts/fetch-model

build:
	cargo build --release --workspace --bins

run: model build
	target/release/inferd --socket $(SOCKET) --workers $(WORKERS) --model $(MODEL) $(RUN_ARGS)

# The end-to-end tests start the real binaries, which `cargo test` does not
# build for another package: build them first.
test: model
	scripts/verify-units
	cargo build --workspace --bins
	$(MAKE) python-test
	cargo test --workspace

# The Python client (clients/python) and its pytest tier: a venv from the
# pinned requirements, rebuilt only when they (or the package's metadata)
# change, then pytest against the real debug binaries.
PYTHON    ?= python3
PY_DIR    := clients/python
PY_VENV   := $(PY_DIR)/.venv
PY_STAMP  := $(PY_VENV)/.installed
PIP_FLAGS := --quiet --disable-pip-version-check --no-input

$(PY_STAMP): $(PY_DIR)/requirements-test.txt $(PY_DIR)/pyproject.toml
	rm -rf $(PY_VENV)
	$(PYTHON) -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install $(PIP_FLAGS) -r $(PY_DIR)/requirements-test.txt
	$(PY_VENV)/bin/pip install $(PIP_FLAGS) -e $(PY_DIR)
	touch $@

python-venv: $(PY_STAMP)

python-test: $(PY_STAMP)
	$(PY_VENV)/bin/python -m pytest $(PY_DIR)/tests -q

bench: model build
	target/release/inferd-bench --model-dir $(MODEL_DIR)

clean:
	cargo clean
