# The two commands a new user needs:
#   make run    set everything up, then run the main job on the embedded Qwen model
#   make test   set everything up, then run the whole test suite
# Both are idempotent: a second call skips every step that is already done.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.torsion-installed
PROFILE ?= quick

.PHONY: setup assets browser postgres run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned exactly: pip takes the CPU build that lies on disk (a range pulls CUDA)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# fast when everything is cached: it checks versions, stamps and records, then returns
assets: $(STAMP)
	$(BIN)/torsion assets pull

run: assets
	$(BIN)/torsion run --profile $(PROFILE)

# the review page is tested in a real headless Chromium from Debian's packages
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# the distributed-search test starts its own PostgreSQL server on loopback from Debian's packages
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq postgresql)

# -rs prints the reason of every skipped test
test: assets browser postgres
	$(BIN)/python -m pytest -q -rs

# each writes benchmarks/results/<name>.json with its baseline and the ratio
bench: assets
	$(BIN)/python benchmarks/bench_capture.py
	$(BIN)/python benchmarks/bench_load.py
	$(BIN)/python benchmarks/bench_bootstrap.py
	$(BIN)/python benchmarks/bench_steer_overhead.py
	$(BIN)/python benchmarks/bench_random_control.py
	$(BIN)/python benchmarks/bench_generate.py  # --sweep: batch sizes 1-64 only; --full (once, long): 256 prompts with the batch-of-one reference
	$(BIN)/python benchmarks/bench_judge.py  # rules-v2/v3 loaded from git history beside the current judges
	$(BIN)/python benchmarks/bench_manifold.py
	$(BIN)/python benchmarks/bench_stability.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_peers.py  # builds .venv-peers (transformers 4, numpy 1) on first use
	$(BIN)/python benchmarks/bench_heretic.py  # builds .venv-heretic (heretic-llm 1.4.0) on first use; needs `make run`'s run; long

clean:
	rm -rf $(VENV) runs .pytest_cache
