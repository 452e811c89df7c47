"""Reads ``pytorch_model.bin`` state dicts into numpy without importing torch.

``torch.save`` writes a zip: ``<root>/data.pkl`` (a pickle whose tensors refer
to storages by key) and ``<root>/data/<key>`` (raw little-endian storage
bytes). The unpickler below resolves only what a state dict contains (tensors,
parameters, ordered dicts) and refuses every other class, so loading a
checkpoint never runs code from it.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[offset], copy=True)
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, path: Path):
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._path = path

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"{self._path}: holds a {module}.{name} object; only plain state dicts of tensors "
            "load without torch (re-save it with safetensors)"
        )

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"{self._path}: unknown persistent id {kind!r}")
        dtype = storage_type.dtype
        raw = self._archive.read(f"{self._root}/data/{key}")
        return np.frombuffer(raw, dtype=dtype, count=numel)


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{name: array}`` from a ``torch.save`` zip file (torch >= 1.6 format)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format torch checkpoint (the legacy pre-1.6 format is not "
            "supported); re-save it with torch>=1.6 or as safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError(f"{path}: no data.pkl inside; is this a torch.save file?")
        root = pickles[0][: -len("/data.pkl")]
        byteorder = f"{root}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        with archive.open(pickles[0]) as f:
            state = _StateDictUnpickler(f, archive, root, path).load()
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return {str(k): np.asarray(v) for k, v in state.items()}
