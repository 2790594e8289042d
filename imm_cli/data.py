"""Byte tokens, the embedded Shakespeare corpus, checked text files and training episodes.

Tokens are UTF-8 bytes (vocabulary 256), so any text, digits included, can be encoded.
"""

from __future__ import annotations

import functools
import lzma
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

from imm_cli.errors import InputError

DEFAULT_CORPUS_NAME = "shakespeare (embedded)"
CORPUS_RESOURCE = "shakespeare.txt.xz"


# ----------------------------------------------------------------------------- bytes


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as a uint8 array."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(b: Any) -> str:
    """Text from bytes / list[int] / numpy or torch integer arrays; invalid UTF-8 becomes U+FFFD."""
    if isinstance(b, (bytes, bytearray, memoryview)):
        raw = bytes(b)
    else:
        if isinstance(b, torch.Tensor):
            b = b.detach().cpu().numpy()
        arr = np.asarray(b).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("decode: token values must be bytes in 0..255")
        raw = arr.astype(np.uint8).tobytes()
    return raw.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- files


@functools.lru_cache(maxsize=1)
def load_default_corpus() -> str:
    """The embedded Shakespeare corpus (shipped in the package, works offline)."""
    packed = resources.files("imm_cli").joinpath(CORPUS_RESOURCE).read_bytes()
    return lzma.decompress(packed).decode("utf-8")


def read_text_file(path: str | os.PathLike[str], what: str = "data file", max_bytes: int = 200_000_000) -> str:
    """Read a UTF-8 text file, raising a one-line InputError naming the file and the problem."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise InputError(f"{what} {name} does not exist")
    if os.path.isdir(name):
        raise InputError(f"{what} {name} is a directory, not a file")
    if not os.path.isfile(name):
        raise InputError(f"{what} {name} is not a regular file")
    try:
        size = os.path.getsize(name)
        if size > max_bytes:
            raise InputError(f"{what} {name} is too large ({size:,} bytes; at most {max_bytes:,})")
        with open(name, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{what} {name} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise InputError(f"{what} {name} is too large (more than {max_bytes:,} bytes)")
    if not raw:
        raise InputError(f"{what} {name} is empty")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{what} {name} looks binary (NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {name} is not UTF-8 (invalid byte at offset {exc.start})") from None


# ----------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 bytes, first 90%
    val: np.ndarray  # uint8 bytes, last 10%
    source: str  # DEFAULT_CORPUS_NAME or the file path


def split_bytes(data: np.ndarray, train_frac: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    n_train = int(len(data) * train_frac)
    return data[:n_train], data[n_train:]


def load_corpus(path: str | os.PathLike[str] | None = None, min_bytes: int = 1024) -> Corpus:
    """The training corpus: the embedded one (``path=None``) or a UTF-8 file, split 90/10.

    ``min_bytes`` is the smallest acceptable validation split (e.g. a few blocks); a file
    too small to provide it raises InputError.
    """
    if path is None:
        text, source = load_default_corpus(), DEFAULT_CORPUS_NAME
    else:
        text, source = read_text_file(path, what="data file"), os.fspath(path)
    data = encode(text)
    train, val = split_bytes(data)
    if len(val) < min_bytes:
        need = int(np.ceil(min_bytes / 0.1))
        raise InputError(
            f"data file {source} is too small ({len(data):,} bytes; need at least {need:,} "
            f"so that the 10% validation split holds {min_bytes:,} bytes)"
        )
    return Corpus(train=train, val=val, source=source)


# ----------------------------------------------------------------------------- batches


def sample_episodes(
    data: np.ndarray, n: int, segments: int, block: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n episodes of ``segments`` consecutive blocks of ``data``.

    Returns x, y of shape (n, segments, block), int64; y is x shifted by one byte in the
    source text (so y[:, s, -1] == x[:, s + 1, 0]). Start positions come from ``gen``.
    """
    span = segments * block
    if len(data) < span + 1:
        raise InputError(f"text of {len(data):,} bytes is too short for {segments} segments of {block} bytes")
    src = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
    starts = torch.randint(0, len(data) - span, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(span + 1)[None, :]
    seq = src[idx].long()
    x = seq[:, :-1].reshape(n, segments, block)
    y = seq[:, 1:].reshape(n, segments, block)
    return x, y
