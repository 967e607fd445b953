"""Minimal PNG encoder/size reader (zlib only), so the report needs no imaging library."""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, level: int = 9) -> bytes:
    """PNG bytes of a ``uint8`` array ``[H, W]`` or ``[H, W, C]`` with C in 1..4."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise TypeError(f"encode_png needs uint8 pixels, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in _COLOR_TYPES or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"encode_png needs [H, W] or [H, W, C<=4] pixels, got shape {array.shape}")
    height, width, channels = array.shape
    rows = np.ascontiguousarray(array).reshape(height, width * channels)
    # filter type 1 (Sub) on every row: neighbouring pixels of smooth images differ little
    filtered = rows.astype(np.int16)
    filtered[:, channels:] -= rows[:, :-channels].astype(np.int16)
    raw = np.empty((height, width * channels + 1), dtype=np.uint8)
    raw[:, 0] = 1
    raw[:, 1:] = (filtered & 0xFF).astype(np.uint8)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    data = zlib.compress(raw.tobytes(), level)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's header, or None when ``data`` is not a PNG."""
    if len(data) < 24 or data[:8] != _SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)
