"""The documentation: every Example in the public API's docstrings runs and prints what it
shows (doctest), and the public functions and classes document their Parameters, Returns,
Raises, See Also and Examples in NumPy's style."""
import doctest
import importlib
import inspect

import numpy as np
import pytest

import cattn

# Modules whose docstrings carry examples; cattn._api is compiled, so its functions are
# collected through the public names rather than by doctest's finder.
MODULES = ["cattn", "cattn._api", "cattn._varlen", "cattn._paged", "cattn._cache",
           "cattn._runtime",
           "cattn._shared_prefix", "cattn._position_bias",
           "cattn.layers", "cattn.reference",
           "cattn.models.bert", "cattn.models.minilm"]

# The public API (cattn.__all__ without the submodule and the version string), with the
# methods users call.
PUBLIC = ["scaled_dot_product_attention", "merge_attention", "varlen_attention",
          "shared_prefix_attention",
          "MultiHeadAttention",
          "MultiHeadAttention.__call__", "KVCache", "paged_attention", "PagedKVCache",
          "RelativePositionBias",
          "set_num_threads", "get_num_threads",
          "threads", "show_config"]


def _docstrings():
    """(name, docstring) of every module, function, class and method of MODULES."""
    seen = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        yield module_name, module.__doc__ or ""
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            members = [(name, obj)]
            if inspect.isclass(obj):
                members += [(f"{name}.{m}", v) for m, v in vars(obj).items()
                            if not m.startswith("_") or m == "__call__"]
            for qualname, member in members:
                doc = inspect.getdoc(member) if not isinstance(member, property) else (
                    member.__doc__)
                if doc and id(member) not in seen:
                    seen.add(id(member))
                    yield f"{module_name}.{qualname}", doc


DOCSTRINGS = [(name, doc) for name, doc in _docstrings() if ">>>" in doc]


def test_there_are_examples_to_run():
    names = {name for name, _ in DOCSTRINGS}
    assert {"cattn", "cattn._api.scaled_dot_product_attention"} <= names


@pytest.mark.parametrize("name,doc", DOCSTRINGS, ids=[n for n, _ in DOCSTRINGS])
def test_examples_run(name, doc):
    parser = doctest.DocTestParser()
    test = parser.get_doctest(doc, {"np": np, "cattn": cattn}, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS
                                   | doctest.NORMALIZE_WHITESPACE)
    with np.printoptions(precision=4, suppress=True):
        runner.run(test, out=lambda text: pytest.fail(text, pytrace=False))
    assert runner.summarize(verbose=False).attempted > 0


def _public(name):
    obj = cattn
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", PUBLIC)
def test_public_api_docstring_sections(name):
    obj = _public(name)
    doc = inspect.getdoc(obj) or ""
    needed = ["See Also", "Examples"]
    if inspect.isclass(obj) or [p for p in inspect.signature(obj).parameters
                                if p != "self"]:
        needed.append("Parameters")
    if not inspect.isclass(obj) and name not in ("set_num_threads",):
        needed.append("Returns")
    if name not in ("get_num_threads",):
        needed.append("Raises")
    for section in needed:
        assert f"\n{section}\n" + "-" * len(section) in doc, (
            f"{name}'s docstring has no {section!r} section")
