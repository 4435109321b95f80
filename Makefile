# The two commands of the README:  make run  (set up, then run the main job: the quick-profile study)
#                                  make test (set up, then run the test suite)
PY := .venv/bin/python

.PHONY: setup run single report test test-all
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) tuning/sweep.py --resume

single: setup
	$(PY) -m decrop run --config configs/quick.yaml

report: setup
	$(PY) analysis/report.py

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""
