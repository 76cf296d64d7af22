"""The public surface: what README documents is importable, and nothing heavy loads on import."""

import subprocess
import sys

import ih_circuits


def test_all_names_resolve():
    for name in ih_circuits.__all__:
        assert getattr(ih_circuits, name) is not None, name


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
