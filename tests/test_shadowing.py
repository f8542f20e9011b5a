"""No module of ours may take the name of one Python would otherwise import.

Every command runs with the repository's folder first on sys.path (and pytest puts tests/
there too), so a top-level `kernels.py` is what `import kernels` finds, for us and for
every package we use: transformers 5 imports the PyPI package `kernels`, and got ours.
So a module here must not be named like the standard library or like a top-level module
of any installed distribution. Run after `pip install -r requirements.txt`, this checks
the names against everything a user of this repository has installed."""
import importlib.metadata
import os
import sys

from conftest import ROOT


def module_names(folder):
    """The names `import NAME` finds in folder: NAME.py files and NAME/ packages."""
    names = set()
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
    return names


def shadowed(folder):
    """[(module, what it shadows)] for the modules of folder."""
    installed = importlib.metadata.packages_distributions()  # top-level name -> [dists]
    clashes = []
    for name in sorted(module_names(folder)):
        if name in sys.stdlib_module_names:
            clashes.append((name, "the standard library"))
        elif name in installed:
            clashes.append((name, "the installed package " + ", ".join(installed[name])))
    return clashes


def test_no_module_shadows_the_standard_library_or_an_installed_package():
    clashes = shadowed(ROOT) + shadowed(os.path.join(ROOT, "tests"))
    assert not clashes, "rename these modules, they hide what Python would import: " + "; ".join(
        f"{name}.py shadows {what}" for name, what in clashes)


def test_the_check_sees_a_module_named_like_a_dependency(tmp_path):
    # the check itself, on a folder that has the mistakes it looks for
    for name in ("datasets.py", "tokenizers.py", "json.py", "ours.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    found = dict(shadowed(tmp_path))
    assert found["json"] == "the standard library"
    assert "datasets" in found["datasets"] and "tokenizers" in found["tokenizers"]
    assert "numpy" in found["numpy"]
    assert "ours" not in found
