# make demo: set up the environment and run the main job on the bundled small model (CPU).
# make test: set up the environment and run the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# One Inductor cache for every compiled test: a cold CPU compile costs ~20 s.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: setup demo test test-thorough test-gpu model clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch that lies on this kind of machine's disk, and the Triton that matches it.
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1
	$(PY) -m pip install -q -e '.[dev]'
	# gensim only for the Wikipedia articles in its test data; none of its dependencies are needed.
	$(PY) -m pip install -q --no-deps gensim
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m stq_compiler.demo

test: setup
	$(PY) -m pytest -q -m "not cuda"

# The property tests (tests/properties) with the "thorough" hypothesis profile: 200 examples per
# test (more for single ops) instead of CI's few. Slow: about 13 minutes on 2 cores.
test-thorough: setup
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q tests/properties

# On a machine with a CUDA GPU (its own torch): the Triton kernels against the reference ops.
test-gpu:
	python3 -m pytest -q -s -m cuda tests

# Retrain the bundled model (stq_compiler/training.py): corpora, tokenizer and token ids here, then
# training (about 6 min on one H200; on a CPU only for a look: it is far too slow there).
model: setup
	$(PY) -m stq_compiler.training prepare --out .cache/stq-tiny-llada
	$(PY) -m stq_compiler.training train --data .cache/stq-tiny-llada --out stq_compiler/models/bundled/stq-tiny-llada

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
