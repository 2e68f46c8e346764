# `make tour` and `make test` set everything up on a fresh machine: a .venv with the pinned stack, then the job.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup tour test lab exercises gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

tour: $(STAMP)                     ## every technique on 4 simulated ranks against its reference
	$(BIN)/python -m minidist tour $(ARGS)

test: $(STAMP)                     ## the whole suite, notebooks under nbval included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

gpu-check: $(STAMP)                ## the tour over NCCL (one rank per GPU) and the torchrun example, on GPUs
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh

lab: $(STAMP)                      ## JupyterLab on the chapters
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) build *.egg-info
