# The two commands of the README:  make run  (set up, then run the main job on the quick profile)
#                                  make test (set up, then run the test suite)
PY := .venv/bin/python

.PHONY: setup run test test-all sweep
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m decrop run --config configs/quick.yaml

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

sweep: setup
	$(PY) tuning/sweep.py
