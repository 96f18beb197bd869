# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# the reference model: ../shared/reference-lm in this workplace; elsewhere pass MODEL=<folder or hub id>
MODEL   ?= $(firstword $(wildcard ../shared/reference-lm) HuggingFaceTB/SmolLM2-135M)
EVAL    ?= $(wildcard ../shared/corpus/test.txt)
# empty: the CLI's default carve (single-neuron experts, 25% active); or e.g. CONFIG=S2A2E8
CONFIG  ?=
OUT     ?= out/demo$(if $(CONFIG),-$(CONFIG))

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned: 2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a CUDA build
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/moecarve carve $(MODEL) $(if $(CONFIG),--config $(CONFIG)) --out $(OUT) --overwrite \
	    $(if $(EVAL),--ppl $(EVAL) --ppl-chars 200000 --ppl-seqlen 512)

test: install-test
	$(BIN)/python -m pytest -x

clean:
	rm -rf out .pytest_cache
