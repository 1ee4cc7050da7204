# The two commands of the README. Both set up (or refresh) .venv first; a second run is fast.
.PHONY: setup demo test test-fast bench science clean

setup:
	@bash scripts/setup_env.sh cpu

demo: setup
	.venv/bin/bpo-ray demo --out $${BPO_DEMO_OUT:-runs/demo}

test: setup
	.venv/bin/python -m pytest -q $${PYTEST_ARGS:-}

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

bench: setup
	.venv/bin/python bench/generate.py && .venv/bin/python bench/train.py && .venv/bin/python bench/serve.py

# The multi-seed table a model-quality claim quotes (about 15 minutes a seed on 2 cores).
science: setup
	.venv/bin/python bench/science.py --seeds $${SEEDS:-0 1 2} --out $${BPO_SCIENCE_OUT:-runs/science}

clean:
	rm -rf .venv runs .pytest_cache
