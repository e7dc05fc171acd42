# Quickstart targets; each sets up .venv first (idempotent).
.PHONY: setup test demo

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

demo: setup
	bash examples/quickstart.sh

# Benchmarks (real teacher, ../shared/data/dolly); each prints a markdown table and writes
# benchmarks/results/<name>.json. `make bench` runs all six.
BENCH = .venv/bin/python -m benchmarks
.PHONY: bench bench-extract bench-footprint bench-train bench-loader bench-e2e bench-bases bench-scale bench-precision

bench: bench-extract bench-footprint bench-train bench-loader bench-e2e bench-scale

bench-extract: setup
	$(BENCH).extract_overhead

bench-footprint: setup
	$(BENCH).cache_footprint

bench-train: setup
	$(BENCH).train_step

bench-loader: setup
	$(BENCH).loader_headroom

bench-e2e: setup
	$(BENCH).end_to_end

# Not part of `make bench` (about 25 minutes): one round of FDD, DistiLLM and DistiLLM-2, each with and
# without MTA, beside srkl.
bench-bases: setup
	$(BENCH).bases_round

bench-scale: setup
	$(BENCH).scale

# Not part of `make bench` (about 10 minutes): training from the int8 and mixed caches against the bf16 one.
bench-precision: setup
	$(BENCH).cache_precision
