"""The package's layout as built and as documented: no compiled module older than its
source (a stale .so shadows the edited .py and the tests would run the old code), and the
README's module map lists every module."""
import importlib
import os
import re
from pathlib import Path

import pytest

import cattn

PACKAGE = Path(cattn.__file__).parent
ROOT = PACKAGE.parent
SOURCE_SUFFIXES = (".py", ".pyx", ".pxd")


def compiled_modules():
    """(module name, path of its extension) for every extension module in the package."""
    found = []
    for path in sorted(PACKAGE.glob("*.so")) + sorted(PACKAGE.glob("*.pyd")):
        found.append((f"cattn.{path.name.split('.')[0]}", path))
    return found


def test_no_compiled_module_is_older_than_its_source():
    """The bug: a .py/.pyx (or its .pxd) edited without `python setup.py build_ext
    --inplace`; the old .so still imports first, so the edit is silently not run."""
    pairs = []
    for name, extension in compiled_modules():
        sources = [extension.with_name(extension.name.split(".")[0] + suffix)
                   for suffix in SOURCE_SUFFIXES]
        sources = [s for s in sources if s.exists()]
        if sources:
            pairs.append((name, extension, sources))
    if not pairs:
        pytest.skip("no compiled module with its source beside it (an installed wheel)")
    stale = [f"{extension.name} is older than {source.name}"
             for name, extension, sources in pairs for source in sources
             if os.path.getmtime(extension) < os.path.getmtime(source)]
    assert not stale, ("rebuild with `python setup.py build_ext --inplace`: "
                       + "; ".join(stale))


def test_each_compiled_module_imports_from_its_extension():
    """A module listed as compiled is the extension, not its .py (which it shadows)."""
    modules = compiled_modules()
    if not modules:
        pytest.skip("no compiled modules beside the package (not an in-place build)")
    for name, extension in modules:
        assert Path(importlib.import_module(name).__file__) == extension


def test_the_readme_module_map_lists_every_module():
    """The bug: a module added (or split off) without a line in the README's map."""
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("no README beside the package (an installed wheel)")
    text = readme.read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    listed = set(re.findall(r"\b(_?[a-z_]+\.(?:py|pyx|pxd))\b", layout))
    listed |= set(re.findall(r"cattn/([a-z_]+)/", layout))
    modules = {p.name for p in PACKAGE.iterdir()
               if p.suffix in (".py", ".pyx") and p.name != "__init__.py"}
    packages = {p.name for p in PACKAGE.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted((modules - listed) | (packages - listed))
    assert not missing, f"README's module map lacks {missing}"
