"""A checkpoint dict as a JSON tree plus a flat map of tensors: the encoding behind :mod:`.checkpoint_io`.

Every tensor and numpy array goes to ``tensors.safetensors`` under a generated key and the nested dict becomes
``tree.json`` with tagged references to them, so reading a checkpoint back never unpickles anything: only the
types :func:`_allowed_types` lists may be named, and they are looked up here, never imported from the file.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.data import AttributeDict

TREE_FILE = "tree.json"
_TAG = "__t__"
# Stored natively by safetensors; any other strided dtype is stored as raw bytes and viewed back.
_NATIVE_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
}  # fmt: skip


def _dtype_by_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} in checkpoint")
    return dtype


def _join(where: str, key: Any) -> str:
    return f"{where}/{key}" if where else str(key)


def _allowed_types() -> dict[str, type]:
    """Classes a checkpoint may name (Lightning stores ``type(hparams)``); never imported from the file."""
    types: list[type] = [dict, list, tuple, OrderedDict, AttributeDict]
    try:
        from omegaconf import DictConfig, ListConfig

        types += [DictConfig, ListConfig]
    except ImportError:  # omegaconf is optional for this module
        pass
    return {f"{t.__module__}.{t.__qualname__}": t for t in types}


def _exact_numpy_dtype(dtype: np.dtype, where: str) -> str:
    """The dtype string, refusing dtypes that a string cannot rebuild (objects, structured records)."""
    if dtype.hasobject or np.dtype(dtype.str) != dtype:
        raise TypeError(f"Cannot store numpy dtype {dtype} at checkpoint key '{where}'")
    return dtype.str


class TreeEncoder:
    """Turns a checkpoint dict into a JSON tree plus a flat ``{key: tensor}`` map for safetensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_view: dict[tuple[Any, ...], str] = {}

    def encode(self, obj: Any, where: str) -> Any:
        kind = type(obj)
        if obj is None or kind in (bool, int, str):
            return obj
        if kind is float:
            return obj if math.isfinite(obj) else {_TAG: "float", "value": repr(obj)}
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, where)
        if isinstance(obj, np.ndarray):
            return self._ndarray(obj, where)
        if isinstance(obj, np.generic):
            return {_TAG: "npscalar", "dtype": _exact_numpy_dtype(obj.dtype, where), "hex": obj.tobytes().hex()}
        if isinstance(obj, dict):
            return self._dict(obj, where)
        if kind is list:
            return [self.encode(v, _join(where, i)) for i, v in enumerate(obj)]
        if kind is tuple:
            return {_TAG: "tuple", "items": [self.encode(v, _join(where, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, PurePath):
            return {_TAG: "path", "value": str(obj)}
        if kind is bytes:
            return {_TAG: "bytes", "hex": obj.hex()}
        if isinstance(obj, type):
            name = f"{obj.__module__}.{obj.__qualname__}"
            if name in _allowed_types():
                return {_TAG: "type", "name": name}
        container = _omegaconf_to_container(obj)
        if container is not None:
            return self.encode(container, where)
        raise TypeError(f"Cannot store {kind.__module__}.{kind.__qualname__} at checkpoint key '{where}'")

    def _dict(self, obj: dict[Any, Any], where: str) -> Any:
        if type(obj) is dict and all(type(k) is str for k in obj) and _TAG not in obj:
            return {k: self.encode(v, _join(where, k)) for k, v in obj.items()}
        # Other dict subclasses come back as plain dicts: better than refusing mid-run, and Lightning only makes these.
        cls = {OrderedDict: "odict", AttributeDict: "attrdict"}.get(type(obj), "dict")
        node: dict[str, Any] = {
            _TAG: "dict",
            "cls": cls,
            "items": [
                [self.encode(k, _join(where, f"<key {k}>")), self.encode(v, _join(where, k))] for k, v in obj.items()
            ],
        }
        metadata = getattr(obj, "_metadata", None)  # nn.Module.state_dict() keeps per-module versions here
        if cls == "odict" and metadata is not None:
            node["meta"] = self.encode(metadata, _join(where, "_metadata"))
        return node

    def _tensor(self, t: torch.Tensor, where: str) -> dict[str, Any]:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"Cannot store tensor of type {type(t).__qualname__} ({t.layout}) at key '{where}'")
        if t.device.type == "meta":
            raise TypeError(f"Cannot store a meta tensor (no data) at checkpoint key '{where}'")
        # Identical views of one storage (tied weights, the same tensor twice) are stored once and come back as one
        # tensor object; empty tensors are never merged since they all report a null data pointer.
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        key = self._by_view.get(view) if t.numel() else None
        if key is None:
            key = f"t{len(self.tensors)}"
            self.tensors[key] = t
            if t.numel():
                self._by_view[view] = key
        return {_TAG: "tensor", "key": key}

    def _ndarray(self, arr: np.ndarray, where: str) -> dict[str, Any]:
        dtype = _exact_numpy_dtype(arr.dtype, where)
        raw = np.array(arr, copy=True, order="C").reshape(-1).view(np.uint8)
        key = f"t{len(self.tensors)}"
        self.tensors[key] = torch.from_numpy(raw)
        return {_TAG: "ndarray", "key": key, "dtype": dtype, "shape": list(arr.shape)}


def _omegaconf_to_container(obj: Any) -> Any:
    """Plain containers for an omegaconf node (resolved, so the checkpoint describes itself), else None."""
    try:
        from omegaconf import Container, OmegaConf
    except ImportError:
        return None
    if isinstance(obj, Container):
        return OmegaConf.to_container(obj, resolve=True)
    return None


def prepare_for_safetensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous, no shared storage (safetensors refuses it); odd dtypes become bytes.

    Returns the tensors to write and ``{key: torch dtype name}`` for the ones stored as bytes.
    """
    out = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    owners: dict[int, int] = {}
    for t in out.values():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            owners[ptr] = owners.get(ptr, 0) + 1
    raw: dict[str, str] = {}
    for k, t in out.items():
        if t.numel() and owners[t.untyped_storage().data_ptr()] > 1:
            t = t.clone()
        if t.dtype not in _NATIVE_DTYPES:
            raw[k] = str(t.dtype).removeprefix("torch.")
            t = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        out[k] = t
    return out, raw


class TreeDecoder:
    def __init__(self, tensors: dict[str, torch.Tensor], raw: dict[str, dict[str, Any]]) -> None:
        self.tensors = tensors
        self.raw = raw
        self._types = _allowed_types()

    def decode(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        tag = node.get(_TAG)
        if tag is None:
            return {k: self.decode(v) for k, v in node.items()}
        if tag == "tensor":
            return self._tensor(node["key"])
        if tag == "ndarray":
            data = self.tensors[node["key"]].cpu().numpy().tobytes()
            return np.frombuffer(data, dtype=np.dtype(node["dtype"])).reshape(node["shape"]).copy()
        if tag == "npscalar":
            return np.frombuffer(bytes.fromhex(node["hex"]), dtype=np.dtype(node["dtype"]))[0]
        if tag == "dict":
            return self._dict(node)
        if tag == "tuple":
            return tuple(self.decode(v) for v in node["items"])
        if tag == "float":
            return float(node["value"])
        if tag == "path":
            return Path(node["value"])
        if tag == "bytes":
            return bytes.fromhex(node["hex"])
        if tag == "type" and node["name"] in self._types:
            return self._types[node["name"]]
        raise ValueError(f"unknown node {node!r} in {TREE_FILE}")

    def _tensor(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        spec = self.raw.get(key)
        if spec is not None:  # stored as bytes: view back as the original dtype and shape
            t = t.view(_dtype_by_name(spec["dtype"])).reshape(spec["shape"])
        return t

    def _dict(self, node: dict[str, Any]) -> dict[Any, Any]:
        cls = {"odict": OrderedDict, "attrdict": AttributeDict}.get(node["cls"], dict)
        out = cls((self.decode(k), self.decode(v)) for k, v in node["items"])
        if "meta" in node:
            out._metadata = self.decode(node["meta"])  # type: ignore[attr-defined]
        return out
