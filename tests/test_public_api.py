"""The public surface: what README documents is importable, and nothing heavy loads on import."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ih_circuits


def test_every_name_the_readme_uses_resolves_through_all():
    """Each ``ih.X.Y`` in README.md starts with a name in ``__all__`` and resolves attribute by attribute."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    chains = set(re.findall(r"\bih\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", readme))
    assert len(chains) >= 20  # the README's tour names at least this many
    for chain in sorted(chains):
        head, *rest = chain.split(".")
        assert head in ih_circuits.__all__, chain
        value = getattr(ih_circuits, head)
        for name in rest:
            value = getattr(value, name)


@pytest.mark.e2e  # a fresh interpreter importing torch: seconds
def test_import_does_not_load_plotting_libraries_or_ray():
    code = "import sys, ih_circuits; print(any(m in sys.modules for m in ('matplotlib', 'circuitsvis', 'ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_only_the_adapter_module_asks_whether_a_model_is_ours():
    """Model-specific behaviour goes through ih_circuits/adapters.py (``adapt``, ``white_box``), nowhere else
    outside the model package itself."""
    import re
    from pathlib import Path

    package = Path(ih_circuits.__file__).parent
    pattern = re.compile(r"isinstance\([^)]*IHTransformer")
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "adapters.py" and path.parent.name != "model" and pattern.search(path.read_text())
    ]
    assert offenders == []
    assert pattern.search((package / "adapters.py").read_text())


def test_notebook_progress_bars_are_widgets_not_warnings():
    """tqdm.auto in Jupyter uses tqdm.notebook, which needs ipywidgets (the notebook and dev extras); without it
    every notebook prints a TqdmWarning."""
    import warnings

    from tqdm.notebook import tqdm as notebook_tqdm

    with warnings.catch_warnings(), open(os.devnull, "w") as sink:
        warnings.simplefilter("error")
        bar = notebook_tqdm(total=2, file=sink)
        bar.update(2)
        bar.close()
    assert type(bar.container).__name__ == "TqdmHBox"


def test_every_public_name_has_one_home_and_loads_on_first_use():
    """``__all__`` is exactly the lazily loaded names (each from the module that defines it), the submodules and
    the version; an unknown name is an AttributeError, as for any module."""
    homes = set(ih_circuits._HOME_OF) | set(ih_circuits._SUBMODULES) | {"__version__"}
    assert homes == set(ih_circuits.__all__) and len(ih_circuits.__all__) == len(set(ih_circuits.__all__))
    for name, module in ih_circuits._HOME_OF.items():
        assert getattr(ih_circuits, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="has no attribute 'NGramTasks'"):
        ih_circuits.NGramTasks  # noqa: B018
