# anogan-lightning: `make train` (installs, then runs the main job), `make test`, `make lint`, `make bench`,
# `make quality` (the seeded quality benchmark: hours on a CPU; see anogan_lightning/quality.py).
# Installed, the same jobs are console commands: anogan-lightning train|predict|export|report|quality
PYTHON ?= python3
# a torch wheel installed before the package, so pip never pulls a multi-GB CUDA build on a
# CPU-only machine; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" from your CUDA index
TORCH_SPEC ?= torch==2.13.0
STAMP := .install.stamp
ARGS ?=

.PHONY: install train test lint format bench quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[all,dev]"
	touch $(STAMP)

train: install
	$(PYTHON) -m anogan_lightning.train +method=anogan $(ARGS)

test: install
	$(PYTHON) -m pytest -q -n auto $(ARGS)

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) tools/check_markdown.py

format: install
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

bench: install
	$(PYTHON) benchmarks/run.py $(ARGS)

quality: install
	$(PYTHON) -m anogan_lightning.quality $(ARGS)

clean:
	rm -rf outputs multirun $(STAMP)
