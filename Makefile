# har-edge developer and operator entry points. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LEGACY_VENV ?= .venv-tflite
DATA_DIR ?= var
PIP_FLAGS ?= --disable-pip-version-check -q
export DVC_NO_ANALYTICS := 1

.PHONY: help run sync lint test test-fast test-legacy-runtime test-podman test-arm64 fuzz train release bench chaos image image-mlflow image-prometheus image-multiarch demo clean

help:
	@echo "make run     start the agent and the sync daemon on embedded defaults, data in ./$(DATA_DIR)"
	@echo "make sync    one sync pass: push the outbox, pull a newer model"
	@echo "make lint    ruff (rules and format) and mypy (strict for the edge packages, a ratchet for the rest)"
	@echo "make test    install everything the tests need and run all of them"
	@echo "make train   retrain the default model from UCI HAPT (dvc repro)"
	@echo "make bench   run the benchmarks and print the table"
	@echo "make fuzz    long structure-aware fuzzing of FIT/CSV/xlsx/zip (hours; FUZZ_SCALE, FUZZ_RUNS)"
	@echo "make chaos   the long fault-injection run: 200+ kill -9, server outages, slow copies (~15 min)"
	@echo "make image   build the edge container image with podman (docker/build.sh edge; ARCH=arm64 under qemu)"
	@echo "make demo    the whole loop on this machine: release, pull, process, push, compare"

$(BIN)/.edge: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e '.[edge]'
	touch $@

$(BIN)/.dev: pyproject.toml $(BIN)/.edge
	$(BIN)/pip install $(PIP_FLAGS) -e '.[edge,trainer,dev]'
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

# retrain the default model from UCI HAPT (dvc repro) and bundle it into the agent
train: $(BIN)/.dev
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	$(BIN)/har-train bundle build/trainer/model har_edge/agent/default_model

# publish build/trainer/model: make release REGISTRY=../model-registry DVC_REMOTE=/srv/dvc-store
release: $(BIN)/.dev
	$(BIN)/har-train release --registry $(REGISTRY) --remote $(DVC_REMOTE) build/trainer/model

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

# inference, end to end, sync, memory and model swap against baselines, in one run (~3-5 min)
bench: $(BIN)/.dev
	$(BIN)/python -m bench.run $(BENCH_ARGS)

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
