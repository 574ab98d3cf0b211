"""Token ids -> text, a piece at a time, never ending a piece in half a character.

o200k tokens are byte sequences: an emoji or a CJK character may span two or three tokens (" 🎉" is
two), and a worker streams one or a few tokens a message. Decoding each message on its own would
send U+FFFD for both halves; `Detokenizer` holds the tail of a split character back until its last
byte arrives.
"""
from __future__ import annotations

from collections.abc import Sequence

# A UTF-8 character is at most 4 bytes, so at most 3 tokens can hold an unfinished one. Ids that
# still do not decode with this many held are not a split character: they go out lossily.
MAX_HELD = 4


def decode_lossy(enc, ids: Sequence[int]) -> str:
    """Invalid UTF-8 becomes U+FFFD; an id outside the vocabulary is dropped (never raises)."""
    try:
        return enc.decode(list(ids))
    except Exception:
        return ""


def _decode_strict(enc, ids: Sequence[int]) -> str | None:
    try:
        return enc.decode_utf8(list(ids))
    except Exception:   # incomplete or invalid UTF-8, or an unknown id
        return None


class Detokenizer:
    def __init__(self, enc):
        self._enc = enc
        self._held: list[int] = []

    def push(self, ids: Sequence[int]) -> str:
        """The text `ids` complete: everything up to a character still waiting for its last token."""
        held = self._held + list(ids)
        if not held:
            return ""
        text = _decode_strict(self._enc, held)
        if text is not None:
            self._held = []
            return text
        # Keep the shortest tail whose removal leaves valid text (a split character at the end).
        for keep in range(1, min(len(held), MAX_HELD)):
            text = _decode_strict(self._enc, held[:-keep])
            if text is not None:
                self._held = held[-keep:]
                return text
        if len(held) < MAX_HELD:
            self._held = held
            return ""
        self._held = []
        return decode_lossy(self._enc, held)

    def flush(self) -> str:
        """End of the text: what is held goes out as it is (lossily)."""
        held, self._held = self._held, []
        return decode_lossy(self._enc, held) if held else ""
