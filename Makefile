# har-edge developer and operator entry points. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LEGACY_VENV ?= .venv-tflite
DATA_DIR ?= var
PIP_FLAGS ?= --disable-pip-version-check -q
export DVC_NO_ANALYTICS := 1

.PHONY: help run sync ui lint test test-fast test-legacy-runtime test-podman test-arm64 fuzz train release bench bench-fleet chaos central image image-mlflow image-prometheus image-multiarch demo clean

help:
	@echo "make run     start the agent and the sync daemon on embedded defaults, data in ./$(DATA_DIR)"
	@echo "make sync    one sync pass: push the outbox, pull a newer model"
	@echo "make ui      the MLflow UI on the embedded store of ./$(DATA_DIR) (after make run), http://127.0.0.1:$(UI_PORT)"
	@echo "make lint    ruff (rules and format) and mypy (strict for the edge packages, a ratchet for the rest)"
	@echo "make test    install everything the tests need and run all of them"
	@echo "make train   retrain the default model from UCI HAPT (dvc repro)"
	@echo "make bench   run the benchmarks and print the table"
	@echo "make bench-fleet  50 simulated devices against the central stack (FLEET_N=10: a few minutes)"
	@echo "make fuzz    long structure-aware fuzzing of FIT/CSV/xlsx/zip (hours; FUZZ_SCALE, FUZZ_RUNS)"
	@echo "make chaos   the long fault-injection run: 200+ kill -9, server outages, slow copies (~15 min)"
	@echo "make image   build the edge container image with podman (docker/build.sh edge; ARCH=arm64 under qemu)"
	@echo "make central the fleet's server on this host: PostgreSQL, SeaweedFS (S3), MLflow with accounts"
	@echo "make demo    the whole loop on this machine: release, pull, process, push, compare"

$(BIN)/.edge: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e '.[edge]'
	touch $@

$(BIN)/.dev: pyproject.toml $(BIN)/.edge
	$(BIN)/pip install $(PIP_FLAGS) -e '.[edge,trainer,dev,central]'
	touch $@

# tflite-runtime installs only on CPython <= 3.11 with numpy < 2: its own environment
$(LEGACY_VENV)/bin/.legacy: pyproject.toml
	test -x $(LEGACY_VENV)/bin/python || python3.11 -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/pip install $(PIP_FLAGS) 'tflite-runtime==2.14.*' 'numpy<2' 'pydantic>=2.6,<3' 'sqlalchemy>=2.0,<3' pytest==9.2.0 pytest-timeout==2.4.0
	$(LEGACY_VENV)/bin/pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

# the agent and the sync daemon side by side; Ctrl-C or a SIGTERM to make stops both (each finishes its
# current file or batch). Both run in the background so that the shell's trap runs as soon as a signal comes.
run: $(BIN)/.edge
	export HAR_EDGE_DATA_DIR=$${HAR_EDGE_DATA_DIR:-$(DATA_DIR)}; \
	$(BIN)/har-edge sync run & sync=$$!; \
	$(BIN)/har-edge agent run & agent=$$!; \
	trap 'kill -TERM $$agent $$sync 2>/dev/null' INT TERM; \
	wait $$agent; status=$$?; kill -TERM $$sync 2>/dev/null; wait; exit $$status

sync: $(BIN)/.edge
	HAR_EDGE_DATA_DIR=$${HAR_EDGE_DATA_DIR:-$(DATA_DIR)} $(BIN)/har-edge sync once

# the MLflow UI on the embedded store that `make run` / `make sync` fill (no server needed to collect them).
# The edge extra has mlflow-skinny only; the UI needs full mlflow of the same version (flask, the web app).
MLFLOW_VERSION := $(shell sed -n 's/.*"mlflow-skinny==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
UI_PORT ?= 5000
ui: $(BIN)/.edge
	@$(BIN)/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("mlflow") != "$(MLFLOW_VERSION)")' 2>/dev/null \
	  || { echo "installing mlflow==$(MLFLOW_VERSION) (the UI) into $(VENV)"; $(BIN)/pip install $(PIP_FLAGS) 'mlflow==$(MLFLOW_VERSION)'; }
	@data=$${HAR_EDGE_DATA_DIR:-$(DATA_DIR)}; db=$$(cd "$$data" 2>/dev/null && pwd)/mlflow/mlflow.db; \
	if [ ! -f "$$db" ]; then echo "no MLflow store in $$data/mlflow yet: run make run (or make sync) first"; exit 1; fi; \
	echo "MLflow UI: http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops it)"; \
	echo "  open experiment 'har-edge', then the 'Runs' tab (MLflow 3 opens an experiment on its overview):"; \
	echo "  one run per file (timeline.png, activity_summary.json under Artifacts), 'daily device ...' per device"; \
	MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec $(BIN)/mlflow ui --backend-store-uri "sqlite:///$$db" \
	  --default-artifact-root "$$(dirname "$$db")/artifacts" --host 127.0.0.1 --port $(UI_PORT) --workers 1

# retrain the default model from UCI HAPT (dvc repro) and bundle it into the agent
train: $(BIN)/.dev
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	$(BIN)/har-train bundle build/trainer/model har_edge/agent/default_model

# publish build/trainer/model: make release REGISTRY=../model-registry DVC_REMOTE=/srv/dvc-store
release: $(BIN)/.dev
	$(BIN)/har-train release --registry $(REGISTRY) --remote $(DVC_REMOTE) build/trainer/model

# the central stack of a fleet on this host, until Ctrl-C (docs/deploy.md "Central server"):
#   make central CENTRAL_ROOT=/srv/har-central CENTRAL_ARGS="--host 0.0.0.0 --tls"
CENTRAL_ROOT ?= $(DATA_DIR)/central
central: $(BIN)/.dev
	$(BIN)/python -m har_edge.central up --root $(CENTRAL_ROOT) $(CENTRAL_ARGS)

lint: $(BIN)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/mypy_ratchet.py

# the arm64 image under emulation is left out (make test-arm64: its build alone exceeds CI's budget, docs/deploy.md)
test: $(BIN)/.dev $(LEGACY_VENV)/bin/.legacy
	$(BIN)/python -m pytest -m "not arm64"
	$(MAKE) --no-print-directory test-legacy-runtime

test-fast: $(BIN)/.dev
	$(BIN)/python -m pytest -m "not slow and not podman"

test-legacy-runtime: $(LEGACY_VENV)/bin/.legacy
	HAR_EDGE_TFLITE_RUNTIME=tflite_runtime $(LEGACY_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_runtime.py

# long fuzzing of the input formats (docs/reliability.md): Hypothesis at FUZZ_SCALE x the make-test counts
# (100: ~1 million inputs, hours), then atheris (libFuzzer, coverage-guided) for FUZZ_RUNS inputs if it installs
FUZZ_SCALE ?= 100
FUZZ_RUNS ?= 1000000
fuzz: $(BIN)/.dev
	-$(BIN)/pip install $(PIP_FLAGS) 'atheris==3.0.0' || echo "atheris does not install here: Hypothesis only"
	HAR_EDGE_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -p no:cacheprovider -m fuzz -s tests/test_fuzz_inputs.py
	if $(BIN)/python -c 'import atheris' 2>/dev/null; then \
	  mkdir -p build/fuzz && cd build/fuzz && \
	  PYTHONPATH=$(CURDIR) $(abspath $(BIN))/python $(CURDIR)/tests/fuzz/atheris_inputs.py -runs=$(FUZZ_RUNS) \
	    -rss_limit_mb=1024 -timeout=30 -print_final_stats=1; fi

# inference (and its peers), own model, end to end, sync, memory and model swap in one run (~10-15 min);
# `make bench BENCH_ARGS=--write-docs` publishes the figures (refused while the machine is busy unless BENCH_FORCE=1)
bench: $(BIN)/.dev
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# FLEET_N devices push to the central stack at once, then pull a release from S3; the same push against
# MLflow on SQLite (docs/benchmarks.md "Fleet"). Outboxes filled once under build/fleet-fixture/.
# A few minutes with FLEET_N=10; FLEET_FILES, FLEET_MINUTES, FLEET_WORKERS, FLEET_AUTH_CACHE_TTL
FLEET_N ?= 50
bench-fleet: $(BIN)/.dev
	FLEET_N=$(FLEET_N) $(BIN)/python -m bench.fleet $(FLEET_ARGS)

# the long fault-injection run (tests/test_faults.py is the short one); CHAOS_ARGS="--seed 7 --pause-s 2"
chaos: $(BIN)/.dev
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

# the edge container image (podman; installs podman, runc, debootstrap if missing). ARCH=arm64: the
# linux/arm64 image under qemu-user-static (installed and registered in binfmt_misc if missing; root)
ARCH ?=
image:
	docker/build.sh edge $(if $(ARCH),--arch $(ARCH))

# both edge images and a manifest list holding them (docs/deploy.md says how to push it)
image-multiarch:
	docker/build.sh edge
	docker/build.sh edge --arch arm64
	docker/build.sh manifest

image-prometheus:
	docker/build.sh prometheus

image-mlflow:
	docker/build.sh mlflow

test-podman: $(BIN)/.dev
	$(BIN)/python -m pytest -m podman tests/test_docker.py

# the linux/arm64 image built and run under qemu (cortex-a72), its predictions against the x86_64 image's
test-arm64: $(BIN)/.dev
	$(BIN)/python -m pytest -m arm64 -s tests/test_arm64.py

# the whole loop on this machine: train + release -> pull -> agent -> push -> compare (a real MLflow server)
demo: $(BIN)/.dev
	$(BIN)/python tests/e2e_loop.py

clean:
	rm -rf $(VENV) $(LEGACY_VENV) build *.egg-info .pytest_cache
