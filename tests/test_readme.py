"""The README's Python snippets run as pasted: executed top to bottom in one namespace, as a
reader pastes them into one session. A snippet that needs an optional package (PyTorch, the
pretrained model) is skipped, with the reason, when that package is missing."""
import os
import re
from importlib.util import find_spec

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_snippets():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^ *```python\n(.*?)^ *```", text, flags=re.S | re.M)


def missing_requirement(code):
    """What a snippet needs that is not installed, or None."""
    if re.search(r"^\s*import torch", code, flags=re.M) and find_spec("torch") is None:
        return "PyTorch"
    if "from transformers" in code and find_spec("transformers") is None:
        return "transformers (the transformers extra)"
    if "cattn.dask" in code and find_spec("dask") is None:
        return "Dask (the dask extra)"
    if re.search(r"^\s*import ml_dtypes", code, flags=re.M) and find_spec("ml_dtypes") is None:
        return "ml_dtypes (the bf16 extra)"
    if "MiniLM.from_pretrained()" in code:
        from cattn.models.minilm import pretrained_available
        if not pretrained_available():
            return "the pretrained all-MiniLM-L6-v2 (the model extra and its weights)"
    return None


def dedent_block(code):
    """Snippets nested in a list item are indented: strip the common indentation."""
    lines = code.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines)


def test_readme_snippets_run(capsys):
    snippets = python_snippets()
    assert len(snippets) >= 6, "the README's Python snippets were not found"
    namespace = {"__name__": "__readme__"}
    skipped = []
    for i, code in enumerate(snippets):
        why = missing_requirement(code)
        if why:
            skipped.append(f"snippet {i + 1} needs {why}")
            continue
        try:
            exec(compile(dedent_block(code), f"README.md snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # name the snippet that failed
            raise AssertionError(f"README snippet {i + 1} failed: {type(e).__name__}: {e}\n"
                                 f"{code}") from e
    capsys.readouterr()
    # what the snippets claim in their comments
    assert namespace["out"].shape == (4, 1, 512)
    assert namespace["cache"].lengths.tolist() == [[18] * 4]
    assert namespace["shared"].shape == (16, 8, 1, 64)
    if skipped:
        pytest.skip("; ".join(skipped))
