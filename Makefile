# tff-rec: the two commands a newcomer needs are `make run` and `make test`.
# Both create/refresh .venv first (tools/setup_env.sh; a no-op when nothing
# changed).

PY := .venv/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
# TFF's worker_binary must not inherit a pipe from make; our runtime handles that.

.PHONY: setup run test test-fast bench tables clean-runs

setup:
	@tools/setup_env.sh

# The main job: a short federated training run on MovieLens-100K.
run: setup
	$(PY) -m experiments.run_federated --flagfile=experiments/flags/quickstart.cfg

# The whole test suite (what CI runs).
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Unit tests only (skips end-to-end runs on real MovieLens).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.run_all

# Every published table (hours on 2 cores; see README). E.g.
#   make tables TABLE_ARGS=--data_dir=../shared/data
tables: setup
	@for t in central_baselines fedrecon_ml1m ncf_ml1m privacy_ml1m compression_ml1m \
	    federated_ncf_ml100k federated_ncf_ml1m; do \
	  $(PY) -m experiments.reproduce --flagfile=experiments/flags/table_$$t.cfg $(TABLE_ARGS) || exit 1; \
	done

clean-runs:
	rm -rf runs
