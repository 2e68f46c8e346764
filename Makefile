# `make tour` and `make test` set everything up on a fresh machine: a .venv with the pinned stack, then the job.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup tour test notebooks lab exercises gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

tour: $(STAMP)                     ## every technique on 4 simulated ranks against its reference
	$(BIN)/python -m minidist tour $(ARGS)

# MKL_CBWR=COMPATIBLE makes MKL take another code path for its matrix products, so the suite re-executes the
# notebooks with another summation order than the one that produced their committed outputs (`make notebooks`): a
# notebook that compared a float's last digits would fail here, as it would on another machine.
test: $(STAMP)                     ## the whole suite, notebooks under nbval included
	MKL_CBWR=COMPATIBLE $(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

notebooks: $(STAMP)                ## re-execute every chapter in place (default settings), to commit its outputs
	for nb in notebooks/[0-9]*.ipynb; do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=300 "$$nb" || exit 1; \
	done

gpu-check: $(STAMP)                ## the tour over NCCL (one rank per GPU) and the torchrun example, on GPUs
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh

lab: $(STAMP)                      ## JupyterLab on the chapters
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) build *.egg-info
