"""The former home of the MiniLM model, now `cattn.models.minilm`.

`from cattn.minilm import MiniLM` keeps working: this name is the same module object as
`cattn.models.minilm`, so attributes set on either are seen by both.
"""
import sys

from cattn.models import minilm as _minilm

sys.modules[__name__] = _minilm
