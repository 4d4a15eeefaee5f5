"""Arrays from other libraries without copies: objects that export DLPack (`__dlpack__`),
such as CPU PyTorch tensors, become NumPy views of the same memory."""
import numpy as np

_HOW = ("convert it first with t.numpy() (t.detach().cpu().numpy() for a tensor that requires "
        "grad or is not on the CPU)")


def from_dlpack(x, name):
    """A zero-copy ndarray view of a DLPack producer; anything else is returned as it is
    (the caller validates it). A producer that refuses (a GPU tensor, one that requires
    grad, a dtype NumPy lacks such as bfloat16) gives a TypeError that says how to convert."""
    if x is None or isinstance(x, np.ndarray) or not hasattr(x, "__dlpack__"):
        return x
    try:
        return np.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError) as e:
        raise TypeError(f"{name}: this {type(x).__name__} cannot be shared with NumPy "
                        f"without a copy ({e}); {_HOW}") from None
