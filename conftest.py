"""Test-session settings for tests/ and the doctests; the notebooks that tests/test_notebooks.py runs inherit
them through their kernels' environment."""

import os

# Notebooks and examples read this to run short versions of their training runs.
os.environ.setdefault("IH_CIRCUITS_FAST", "1")
