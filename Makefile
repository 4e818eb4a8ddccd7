# make demo : set up .venv, then prepare -> train -> evaluate -> export -> recommend on built-in data
# make test : set up .venv, then run the test suite
PY := .venv/bin/python
CLI := $(PY) -m twotower_rec
CONFIG ?= configs/demo.yaml

.PHONY: setup demo test bench clean

setup:
	bash launch/setup.sh

demo: setup
	$(CLI) prepare --config $(CONFIG)
	$(CLI) train --config $(CONFIG)
	$(CLI) evaluate --config $(CONFIG)
	$(CLI) export --config $(CONFIG)
	$(CLI) recommend --export runs/demo/export --user 1 -k 10

test: setup
	$(PY) -m pytest -q tests

bench: setup  # the quick ones; see BENCHMARKS.md for the long runs and their commands
	$(PY) benchmarks/bench_batches.py
	$(PY) benchmarks/profile_step.py

clean:
	rm -rf runs
