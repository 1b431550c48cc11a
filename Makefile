# Tribunal: `make run` runs the main job, `make test` installs what the tests need
# and runs every check. See README.md.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
# Tools installed by `cargo install` land here; make sure a fresh shell finds them.
export PATH := $(HOME)/.cargo/bin:$(PATH)

ALLIUM_VERSION := 3.6.1
# Shards for `make run`: one per allowed core.
SHARDS ?= $(shell nproc)
EVENTS ?= 100000

.PHONY: run test lint test-rust specs tools bench clean

## run: release build, then a deterministic sample workload through the core on $(SHARDS) shards,
## cross-checked against the sequential reference interpreter.
run:
	$(CARGO) build --release -p tribunal
	./target/release/tribunal sample --events $(EVENTS) | ./target/release/tribunal evaluate --shards $(SHARDS) -

## test: install missing tools, then formatting, clippy (warnings denied), every Rust test, and the specs.
test: tools lint test-rust specs

tools:
	@command -v allium >/dev/null 2>&1 || { \
		echo "installing allium-cli $(ALLIUM_VERSION) (about 2 minutes)"; \
		$(CARGO) install allium-cli --version $(ALLIUM_VERSION) --locked; }

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-rust:
	$(CARGO) test --workspace

## specs: `allium check` on every spec; any error-severity diagnostic fails.
specs: tools
	@out=$$(allium check specs/*.allium) || { echo "$$out"; echo "allium check failed"; exit 1; }; \
	if grep -q '"severity": "error"' <<<"$$out"; then echo "$$out"; echo "allium check: errors in specs/"; exit 1; fi; \
	echo "allium check: specs/*.allium, no error-severity diagnostics ($$(grep -c '"severity"' <<<"$$out") info/warning)"

## bench: criterion evaluation throughput of the core, and Warden memory per entry.
bench:
	$(CARGO) bench -p tribunal-shards --bench evaluation
	$(CARGO) bench -p tribunal-shards --bench warden_memory

clean:
	$(CARGO) clean
