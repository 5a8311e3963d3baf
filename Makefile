# inferd: the two set-up commands of the README, and a few helpers.
#
#   make run    fetch the default model, build (release), start the daemon
#   make test   fetch the models, build every binary, run the whole test suite

MODEL_DIR ?= $(or $(INFERD_MODEL_DIR),$(HOME)/.cache/inferd/models)
MODEL     ?= $(MODEL_DIR)/all-MiniLM-L6-v2/model.onnx
SOCKET    ?= /tmp/inferd.sock
WORKERS   ?= 2
# Extra inferd flags, e.g. make run RUN_ARGS="--soft-limit 400MiB --hard-limit 600MiB"
RUN_ARGS  ?=

.PHONY: model build run test bench clean

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
	cargo test --workspace

bench: model build
	target/release/inferd-bench --model-dir $(MODEL_DIR)

clean:
	cargo clean
