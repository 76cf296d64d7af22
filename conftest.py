"""Test-session settings shared by tests/, the doctests and the notebooks (executed by nbmake)."""

import os

# Notebooks and examples read this to run short versions of their training runs.
os.environ.setdefault("IH_CIRCUITS_FAST", "1")
