"""The former home of the MiniLM model, now `cattn.models.minilm`.

`from cattn.minilm import MiniLM` keeps working: this name is the same module object as
`cattn.models.minilm`, so attributes set on either are seen by both.
"""
import sys
from typing import TYPE_CHECKING

from cattn.models import minilm as _minilm

if TYPE_CHECKING:  # type checkers read this file, not the module it stands for
    from cattn.models.minilm import *  # noqa: F401,F403

sys.modules[__name__] = _minilm
