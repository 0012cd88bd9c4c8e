"""Property tests (hypothesis) over random small DLLMs: each property is a plain check function
that returns the problems it finds, tested on random configurations and, with a deliberately
broken pass, shown able to fail. Examples per test: the hypothesis profile (tests/conftest.py)."""
