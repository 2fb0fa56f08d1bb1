"""Recognise pickles (.ckpt/.pt/.bin) from a file's first bytes.

Pickled checkpoints are the commonest file people point loraforge at by
mistake, and loading one runs code (see docs/security.md), so they get their
own explanation instead of "not a valid safetensors file". Only the first
bytes are looked at; nothing is unpickled here.

A safetensors file starts with its header length as 8 little-endian bytes,
whose first byte can be anything (0x80 included, like a pickle's PROTO
opcode), so a file that is *plausibly* safetensors is never called a pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since 1.6: a zip holding data.pkl
PROTO = 0x80  # the pickle opcode that starts protocol 2+ streams (legacy torch.save)
HEAD_BYTES = 16


def read_head(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    """The first HEAD_BYTES bytes and the size of a file (OSError propagates)."""
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
        size = os.fstat(handle.fileno()).st_size
    return head, size


def plausible_safetensors(head: bytes, file_size: int) -> bool:
    """The length prefix fits the file and the header starts like a JSON object."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= file_size - 8 and head[8:].lstrip(b" \t\r\n")[:1] in (b"{", b"")


def pickle_kind(head: bytes, file_size: int, name: str = "") -> str | None:
    """What kind of pickle the file is, in words for a message, or None if it does not look like one."""
    if plausible_safetensors(head, file_size):
        return None
    if head.startswith(ZIP_MAGIC):
        return "a PyTorch checkpoint (a zip archive holding a pickle)"
    if len(head) >= 2 and head[0] == PROTO and 2 <= head[1] <= 5:
        return "a Python pickle (the legacy torch.save format)"
    if Path(name).suffix.lower() in PICKLE_SUFFIXES:
        return f"a PyTorch pickle file (by its {Path(name).suffix} extension)"
    return None


def pickle_refusal(path: str | os.PathLike[str], kind: str) -> str:
    """The explanation given when a pickle is refused: why, and the two ways forward."""
    return (
        f"{path} is {kind}, not a .safetensors file. loraforge does not load pickles by default: "
        "unpickling can run any code the file names, so a downloaded .ckpt/.pt/.bin could run programs "
        "on this machine. Convert it to .safetensors with a tool you trust (or ask its publisher for a "
        "safetensors release), or, if you trust the file enough, set `allow_pickle: true` on this input "
        "in the recipe: loraforge then reads it with torch.load(weights_only=True), which refuses "
        "anything but tensors and plain containers, and converts it to safetensors in its cache. "
        "See docs/security.md."
    )
