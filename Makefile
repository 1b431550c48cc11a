# Tribunal: `make run` runs the main job, `make test` installs what the tests need
# and runs every check. See README.md.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
# Tools installed by `cargo install` land here; make sure a fresh shell finds them.
export PATH := $(HOME)/.cargo/bin:$(PATH)

ALLIUM_VERSION := 3.6.1
TANSU_VERSION := 0.6.0
KAFKA ?= 0
EVENTS ?= 100000
RUN_DIR ?= target/run

.PHONY: run test lint test-rust specs chaos-ci docker-ci chaos tools bench bench-core bench-bulk bench-engine bench-kafka bench-federation docker docker-test clean

## run: the main job on the embedded default. A sample workload is appended to a local
## log in $(RUN_DIR), a 3-instance federation (`tribunal cluster`) processes it until every
## record is durable on each instance, each instance's recovered state is checked against
## the reference interpreter's, and the certified outputs are counted (scripts/run-cluster.sh).
## `make run KAFKA=1`: the same job on a Kafka broker it starts (scripts/run-kafka.sh).
run:
	$(CARGO) build --release -p tribunal
ifeq ($(KAFKA),1)
	$(MAKE) --no-print-directory tools
	EVENTS=$(EVENTS) scripts/run-kafka.sh
else
	EVENTS=$(EVENTS) RUN_DIR=$(RUN_DIR) scripts/run-cluster.sh
endif

## test: install missing tools, then formatting, clippy (warnings denied), every Rust test,
## the specs, and the resilience suite at CI size.
test: tools lint test-rust specs chaos-ci docker-ci

## tools: allium-cli for the specs, tansu, the Kafka broker the tests start (about
## 21 minutes to build cold; cached in ~/.cargo/bin afterwards), and schemathesis (PyPI,
## pinned, in a venv under target/tools) for the Gateway's OpenAPI tests.
tools:
	@command -v allium >/dev/null 2>&1 || { \
		echo "installing allium-cli $(ALLIUM_VERSION) (about 2 minutes)"; \
		$(CARGO) install allium-cli --version $(ALLIUM_VERSION) --locked; }
	@tansu --version 2>/dev/null | grep -q "$(TANSU_VERSION)" || { \
		echo "installing tansu $(TANSU_VERSION), the Kafka broker for the tests (about 21 minutes cold)"; \
		$(CARGO) install tansu --version $(TANSU_VERSION) --locked --features dynostore,libsql; }
	@scripts/install-schemathesis.sh

## lint: formatting, clippy with warnings denied, and no non-test function over 70
## lines (clippy.toml). Tests are exempt: the last check builds no test target, and
## `--bench '*'` (not `--benches`, which adds the lib's test build) takes only benches.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --workspace --lib --bins --examples --bench '*' -- -D warnings -D clippy::too_many_lines

## test-rust: every test in a debug build, then the engine's process tests again in a
## release build: a timing assumption that only a slow build meets is a defect.
test-rust:
	$(CARGO) test --workspace
	$(CARGO) test --release -p tribunal --tests

## specs: `allium check` on every spec; any error-severity diagnostic fails.
specs: tools
	@out=$$(allium check specs/*.allium) || { echo "$$out"; echo "allium check failed"; exit 1; }; \
	if grep -q '"severity": "error"' <<<"$$out"; then echo "$$out"; echo "allium check: errors in specs/"; exit 1; fi; \
	echo "allium check: specs/*.allium, no error-severity diagnostics ($$(grep -c '"severity"' <<<"$$out") info/warning)"

## chaos: the resilience suite at full size (loadgen chaos, specs/chaos.allium): every
## scenario with $(CHAOS_EVENTS) commands at $(CHAOS_RATE) requests/s, on 2 and 3 instances,
## SIGKILL at a seeded random moment, then loadgen's verifier, `tribunal inspect` and the
## published outputs. The kills run on the local log and broker-restart on a tansu broker;
## KAFKA=1 runs every scenario on Kafka. Table on stdout, rows in target/chaos/summary.json.
## Then, when a Docker engine answers, the partition scenarios on the compose cluster
## (scripts/docker-partition.sh) for 60 s each, with a 20 s partition.
CHAOS_EVENTS ?= 100000
CHAOS_RATE ?= 2000
ifeq ($(KAFKA),1)
CHAOS_LOGS := --log kafka
else
CHAOS_LOGS := --log local --log kafka
endif
chaos: tools
	$(CARGO) build --release -p tribunal -p tribunal-loadgen
	target/release/loadgen chaos --events $(CHAOS_EVENTS) --rate $(CHAOS_RATE) $(CHAOS_LOGS) \
		--out-dir target/chaos $(if $(SEED),--seed $(SEED))
	@if docker info > /dev/null 2>&1; then \
		for scenario in partition-one partition-publisher; do \
			SCENARIO=$$scenario LOADGEN_RATE=$(CHAOS_RATE) LOADGEN_DURATION_S=60 PARTITION_S=20 \
				scripts/docker-test.sh || exit 1; \
		done; \
	else \
		echo "make chaos: no Docker engine answers: the partition scenarios were skipped"; \
	fi

## chaos-ci: the same scenarios at CI size (5,000 commands at 1,000 requests/s each);
## any violation fails `make test`.
chaos-ci: tools
	$(CARGO) build --release -p tribunal -p tribunal-loadgen
	target/release/loadgen chaos --events 5000 --rate 1000 $(CHAOS_LOGS) --out-dir target/chaos-ci \
		$(if $(SEED),--seed $(SEED))

## bench: a 3-instance cluster serving the REST API, driven by loadgen at 10,000 requests/s
## for 60 s (open loop, latency from the intended send time), invariants checked at the end;
## report in target/bench/loadgen/ (scripts/bench-loadgen.sh; RATE, DURATION, CONNECTIONS
## override). `make bench KAFKA=1`: the same through a Kafka broker it starts
## (target/bench/loadgen-kafka/). `make bench PROFILE=1`: also where the box's CPU went,
## from `perf record -a -g` inside the measured window (profile.txt in the report).
## `make bench BIN=DIR`: the binaries in DIR instead (another build, to compare).
bench:
ifeq ($(KAFKA),1)
	$(MAKE) --no-print-directory tools
endif
	KAFKA=$(KAFKA) $(if $(BIN),BIN=$(BIN)) scripts/bench-loadgen.sh

## bench-bulk: `loadgen bulk`, the end-to-end certified events/s of a 3-instance cluster on a
## log pre-filled with $(EVENTS) loadgen commands, without HTTP (target/bench/bulk.json).
bench-bulk:
	$(CARGO) build --release -p tribunal -p tribunal-loadgen
	rm -rf target/bench/bulk
	target/release/loadgen bulk --events $(EVENTS) --summary-json target/bench/bulk.json

## bench-core: criterion evaluation throughput of the core, and Warden memory per entry.
bench-core:
	$(CARGO) bench -p tribunal-shards --bench evaluation
	$(CARGO) bench -p tribunal-shards --bench warden_memory

## bench-engine: durable throughput over 1,000,000 events and recovery time, as measured
## by the engine (target/bench/engine.json).
bench-engine:
	scripts/bench-engine.sh

## bench-kafka: events/s from a pre-filled 500,000-event topic through one instance to a
## durable Ledger and published outputs, against a plain consumer's rate on the same topic.
bench-kafka: tools
	scripts/bench-kafka.sh

## bench-federation: certified events/s of a 3-instance cluster against one instance with
## expected_copies 1, on the same pre-filled log (target/bench/federation.json).
bench-federation:
	scripts/bench-federation.sh

## docker: the tribunal image (tribunal:latest, with loadgen), from a base image built here
## when missing (scripts/docker-base.sh: debootstrap + docker import; no registry needed).
docker:
	scripts/docker.sh

## docker-ci: `make test`'s Docker tests when a Docker engine answers: docker-test on the
## local log and on Kafka, and the partition scenarios (partition-one, partition-publisher)
## at CI size; with CI=true and no engine a failure, elsewhere a loud skip.
docker-ci:
	@if docker info > /dev/null 2>&1; then \
		scripts/docker-test.sh && KAFKA=1 scripts/docker-test.sh && \
		for scenario in partition-one partition-publisher; do \
			SCENARIO=$$scenario LOADGEN_DURATION_S=20 PARTITION_S=5 scripts/docker-test.sh || exit 1; \
		done; \
	elif [ "$${CI:-}" = true ]; then \
		echo "make test: CI=true, but no Docker engine answers: the Docker tests cannot run" >&2; exit 1; \
	else \
		echo "################ make test: NO DOCKER ENGINE ANSWERS: THE DOCKER TESTS WERE SKIPPED ################"; \
	fi

## docker-test: the compose cluster (docker/compose.yaml) up, healthy, loaded by loadgen
## from inside its network with the invariants checked, then removed (scripts/docker-test.sh).
## `make docker-test KAFKA=1`: the same on a tansu broker (docker/compose.kafka.yaml).
docker-test:
	KAFKA=$(KAFKA) scripts/docker-test.sh

clean:
	$(CARGO) clean
