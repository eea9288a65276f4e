# dalle-hf: every target sets itself up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

OLAH_STAMP := .venv-olah/.stamp-install

.PHONY: venv venv-olah space test test-all bench clean

venv: $(STAMP)

# torch==2.13.0 first: it is a CPU build on this machine's disk; a bare `torch` requirement would pull CUDA.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# olah (a Hub-protocol server for the repo-id test) in its own virtualenv: its dependencies downgrade psutil.
venv-olah: $(OLAH_STAMP)

$(OLAH_STAMP):
	$(PY) -m venv .venv-olah
	.venv-olah/bin/pip install -q olah
	touch $(OLAH_STAMP)

# The main job: the Gradio Space on the embedded default model, at http://127.0.0.1:7860
space: venv
	$(BIN)/python space/app.py

test: venv venv-olah
	$(BIN)/python -m pytest -q

test-all: venv venv-olah
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) .venv-olah build dist *.egg-info
