# Quickstart targets; each sets up .venv first (idempotent).
.PHONY: setup test demo

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

demo: setup
	bash examples/quickstart.sh
