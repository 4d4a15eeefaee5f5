"""Reading .safetensors weights with NumPy alone, one tensor at a time, float32 tensors as
read-only maps of the file."""
import json
import math
import os
import sys

import numpy as np

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
                       "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


class SafetensorsTensor:
    """One tensor of a .safetensors file, read from the file when NumPy asks for it
    (np.asarray): a model is converted one tensor at a time, never holding the whole file
    twice. A float32 tensor asked for as float32 comes as a read-only memory map of the
    file (which BertEncoder keeps as it is: only the pages used are read, so a 30,000-word
    embedding table costs the memory of the words seen)."""

    def __init__(self, path, name, dtype, shape, start, end):
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which cattn does "
                             f"not read (supported: {', '.join(_SAFETENSORS_DTYPES)})")
        self.path, self.name, self.dtype_name = path, name, dtype
        self.shape = tuple(int(n) for n in shape)
        self.start = start
        itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if end - start != math.prod(self.shape) * itemsize:
            raise ValueError(f"{path}: tensor {name!r} of shape {self.shape} and dtype "
                             f"{dtype} does not fit its {end - start} bytes")

    def __array__(self, dtype=None, copy=None):
        stored = np.dtype(_SAFETENSORS_DTYPES[self.dtype_name])
        if (self.dtype_name == "F32" and sys.byteorder == "little" and copy is not True
                and (dtype is None or np.dtype(dtype) == np.float32)
                and math.prod(self.shape) > 0):
            return np.memmap(self.path, dtype=stored, mode="r", offset=self.start,
                             shape=self.shape)
        with open(self.path, "rb") as f:
            f.seek(self.start)
            a = np.fromfile(f, dtype=stored, count=math.prod(self.shape)).reshape(self.shape)
        if self.dtype_name == "BF16":  # the upper half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        a = a.astype(a.dtype.newbyteorder("="), copy=False)
        return a if dtype is None else a.astype(dtype, copy=False)


def read_safetensors(path):
    """{name: SafetensorsTensor} of a .safetensors file (8-byte header size, JSON header,
    raw little-endian data); each tensor is read when converted with np.asarray."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        header_size = int.from_bytes(size_bytes, "little") if len(size_bytes) == 8 else -1
        file_size = os.fstat(f.fileno()).st_size
        if not 0 < header_size <= file_size - 8:
            raise ValueError(f"{path} is not a safetensors file")
        header = json.loads(f.read(header_size))
    base = 8 + header_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (base + o for o in info["data_offsets"])
        if end > file_size:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends past the file")
        tensors[name] = SafetensorsTensor(path, name, info["dtype"], info["shape"], start, end)
    return tensors
