# The two commands of the README:
#   make demo   # prepare synthetic shards, pretrain, finetune, write the Pegasus grid (CPU, offline)
#   make test   # the whole test suite (CI runs exactly this through .ci/run)
# Both create the virtual environment first when it is missing or stale.

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pegasus-dist demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -rsP  # -rsP: skip reasons, and what passing tests printed (SLURM job ids)

clean:
	rm -rf runs shards/smoke wandb
