# The two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The wire contract, and the kubelet's pod-resources API the agent reads (vendored: its SOURCE.md).
PROTO_SRC := proto/fleetwatch/v1/telemetry.proto proto/fleetwatch/kubelet/podresources/v1/api.proto proto/fleetwatch/prompb/types.proto proto/fleetwatch/prompb/remote.proto
# mypy reads an installed copy: the package-dir mapping (fleetwatch.agent in agent/) is invisible to it.
TYPECHECK := build/typecheck

.PHONY: demo test lint proto bench clean install

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fleetwatchctl demo $(DEMO_ARGS)

# The suite, after the habits it keeps: lint and format, types, and (in the suite) the layer contract.
# Two workers, a test file each at a time (module fixtures such as the dashboards' Prometheus run
# once): many tests wait on real processes and services, so two run in the time of one. (Three
# were faster but made tests that bound a wait or a duration flaky on two cores.) Files go out in
# collection order (--no-loadscope-reorder; tests/conftest.py puts the long end-to-end ones
# first), not biggest first, which left a long file for last.
# PYTEST_WORKERS=0 runs them in this process (for -x, pdb, -s).
PYTEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# setuptools builds through build/lib, where modules deleted from the tree would linger.
	rm -rf $(TYPECHECK) build/lib
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --target $(TYPECHECK) .
	cd $(TYPECHECK) && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml

# Regenerates the committed gRPC modules with the grpcio-tools pinned in pyproject's test extra.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTO_SRC)

# collector_fleet.py runs the collector beside Prometheus on the same simulated fleet; Prometheus
# comes from Debian's package, installed here only (make test never needs it).
bench: $(STAMP)
	$(PY) tests/bench/agent_cycle.py
	$(PY) tests/bench/demo_ingest.py
	$(PY) tests/bench/remote_write.py
	$(PY) tests/bench/fleet_scale.py
	$(PY) tests/bench/false_alarms.py
	$(PY) -m fleetwatch.ctl.main eval --corpus tests/scenarios
	command -v prometheus >/dev/null || (apt-get update && apt-get install -y prometheus)
	$(PY) tests/bench/collector_fleet.py

clean:
	rm -rf $(VENV) build *.egg-info
