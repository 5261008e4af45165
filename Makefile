# The two commands of the README. Both run the same idempotent set-up first (scripts/setup.sh):
# a second run takes seconds, the first builds Horovod (about 6 minutes on 2 cores).
VENV := .venv
PYTHON := $(VENV)/bin/python
HOROVODRUN := $(VENV)/bin/horovodrun

.PHONY: setup test demo bench bench-network bench-smoke

setup:
	bash scripts/setup.sh

test: setup
	bash scripts/setup_multihost.sh
	$(PYTHON) -m pytest -ra --durations=15

# 8 ranks on a machine with fewer cores: ranks waiting in MPI must yield their core
# (Open MPI only does so by itself when it knows it is oversubscribed; horovodrun hides that).
demo: setup
	OMPI_MCA_mpi_yield_when_idle=1 $(HOROVODRUN) -np 8 $(PYTHON) examples/train_cnn.py

# benchmarks/RESULTS.md, results.png and network.png from every run (25-40 minutes on 2 cores,
# with the machine's load).
bench: setup
	bash scripts/setup_multihost.sh
	$(PYTHON) benchmarks/run_all.py

# The shaped two-host network alone (about 3 minutes; needs root): then RESULTS.md again.
bench-network: setup
	bash scripts/setup_multihost.sh
	$(PYTHON) benchmarks/run_all.py --only network

# Seconds: every benchmark variant once, on tiny sizes, and one shaped-network point, into a
# temporary directory.
bench-smoke: setup
	bash scripts/setup_multihost.sh
	$(PYTHON) benchmarks/run_all.py --smoke
