"""The README's Python blocks run as pasted: each alone, in a fresh interpreter (its own
imports and data, as a reader pastes one block into a new session), and each shows what its
comments claim: a `print(...)  # <output>` comment that starts like printed output (a
shape, a list, a number, True) must match what the block prints, and the blocks' own
asserts hold. A block that needs an optional package (PyTorch, Dask, ml_dtypes, the
pretrained model) skips, naming it, when that package is missing (fails under CI=true)."""
import os
import re
import subprocess
import sys
from importlib.util import find_spec

import pytest

from conftest import require_peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [dedent_block(code) for code in
            re.findall(r"^ *```python\n(.*?)^ *```", text, flags=re.S | re.M)]


def dedent_block(code):
    """Blocks nested in a list item are indented: strip the common indentation."""
    lines = code.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines) + "\n"


BLOCKS = python_blocks()


def needed_peer(code):
    """The optional module a block imports that is not installed, or None."""
    for pattern, module in ((r"^import torch", "torch"), (r"^import dask", "dask"),
                            (r"^import ml_dtypes", "ml_dtypes"),
                            (r"^(from|import) transformers", "transformers")):
        if re.search(pattern, code, flags=re.M) and find_spec(module) is None:
            return module
    if "MiniLM.from_pretrained()" in code:
        from cattn.models.minilm import WEIGHTS_PACKAGE, pretrained_available
        if not pretrained_available():
            return WEIGHTS_PACKAGE
    return None


# The start of an output: a tuple or list, a number, True/False, a dtype name.
_OUTPUT = re.compile(r"^[\(\[\d-]|^(True|False)\b|^(float|int|bfloat)\d+\b")


def claimed_outputs(code):
    """What the block's `print(...)  # <output>` comments claim, in order: the comment up
    to a ':' that ends the output, without a trailing '...' (an elided rest)."""
    claims = []
    for line in code.splitlines():
        match = re.match(r"\s*print\(.*\)\s*#\s*(.*)$", line)
        if not match or not _OUTPUT.match(match.group(1)):
            continue
        claim = re.split(r":\s", match.group(1))[0].strip()
        claims.append(claim.removesuffix("...").rstrip(", "))
    return claims


def squeeze(text):
    return re.sub(r"\s+", " ", text)


def test_readme_has_its_blocks():
    assert len(BLOCKS) >= 12, "the README's Python blocks were not found"
    assert sum(bool(claimed_outputs(code)) for code in BLOCKS) >= 9


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_block_runs_alone_and_shows_its_claims(index):
    code = BLOCKS[index]
    missing = needed_peer(code)
    if missing:
        require_peer(missing)  # skips (fails under CI=true), naming the peer
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"README block {index + 1} failed when run alone:\n{code}\n"
                                  f"{proc.stderr[-3000:]}")
    printed = squeeze(proc.stdout)
    for claim in claimed_outputs(code):
        assert squeeze(claim) in printed, (f"README block {index + 1} claims {claim!r} but "
                                           f"prints:\n{proc.stdout}")


def test_claims_are_read_from_print_comments():
    code = ("print(x.shape)   # (4, 64) float32: one vector per token\n"
            "print(t)         # (0, 1) [[0, 1, 2], [0, 1, 3], ...\n"
            "print(w)         # each row sums to 1\n"
            "y = f(x)         # (2, 3)\n")
    assert claimed_outputs(code) == ["(4, 64) float32", "(0, 1) [[0, 1, 2], [0, 1, 3]"]
