"""Reads and writes the safetensors format (an 8-byte little-endian header length, a JSON header
of dtype / shape / byte offsets, then the raw little-endian tensor bytes) with torch alone, for
machines without the ``safetensors`` package. Uses the package when it is installed."""

from __future__ import annotations

import json
import struct

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def load_file(path: str) -> dict:
    try:
        from safetensors.torch import load_file as _load

        return _load(path)
    except ImportError:
        pass
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        flat = torch.frombuffer(data, dtype=torch.uint8, count=b - a, offset=a) if b > a else (
            torch.zeros(0, dtype=torch.uint8))
        out[name] = flat.view(_DTYPES[info["dtype"]]).reshape(info["shape"]).clone()
    return out


def save_file(tensors: dict, path: str):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)
