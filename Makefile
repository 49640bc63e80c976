# The commands of the README:
#   make demo    # prepare synthetic shards, pretrain, finetune, write the Pegasus grid (CPU, offline)
#   make check   # the fast tier: ruff, the import layers, shellcheck, the tests that start no process (2 minutes)
#   make test    # everything, SLURM included (CI runs exactly this through .ci/run; 10 minutes)
# Each creates the virtual environment first when it is missing or stale.
# The tiers are pytest marks (pyproject.toml, tests/conftest.py): `process` and
# `slurm` tests start processes, `slow` ones train in this process; `make check`
# runs the tests with none of them, and a test there that starts a process fails.

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed
FAST_TIER := not process and not slow and not slurm

.PHONY: install demo check test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pegasus-dist demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/shellcheck slurm/*.sh bench/*.sh .ci/run

check: lint
	$(VENV)/bin/pytest -m "$(FAST_TIER)" --durations=10

# Three workers on two cores: a test's processes also wait (collective timeouts, SLURM's
# scheduler, signals), and a third worker fills that time. On the 2-core AVX2 EPYC: two
# workers kept 1.70 cores busy (688 s), three 1.83 (605-618 s), four 1.85 but 655 s.
test: lint
	$(VENV)/bin/pytest -n 3 --dist loadfile -rsP --durations=15  # -rsP: skip reasons, and what passing tests printed (SLURM job ids)

clean:
	rm -rf runs shards/smoke wandb
