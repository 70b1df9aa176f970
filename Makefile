# Two targets a new user needs: `make demo` (the main job) and `make test`.
# Both set up .venv/ on first use (pip reuses its cache for torch's wheels).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ray,k8s]'
	touch $(STAMP)

demo: setup
	$(BIN)/moectl demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python bench/kernels.py --quick
	$(BIN)/python bench/dataplane.py

protos: setup
	$(BIN)/python -m moecluster.protos.generate

clean:
	rm -rf $(VENV) *.egg-info
