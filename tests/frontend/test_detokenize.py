"""Incremental detokenization on the real o200k encoding: split characters are held, never mangled."""
from __future__ import annotations

import random

import pytest

from frontend_svc.detokenize import MAX_HELD, Detokenizer

TEXTS = ["Party 🎉 time", "日本語のテキスト", "café 👍🏽 naïve", "plain ascii only",
         "🇯🇵🇫🇷 flags 🧑‍🤝‍🧑"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_gives_the_text_and_no_replacement_characters(enc, text):
    d = Detokenizer(enc)
    pieces = [d.push([t]) for t in enc.encode(text)] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_any_chunking_gives_the_same_text(enc):
    ids = enc.encode(" ".join(TEXTS))
    rng = random.Random()
    for _ in range(50):
        d, pieces, i = Detokenizer(enc), [], 0
        while i < len(ids):
            n = rng.randint(1, 6)
            pieces.append(d.push(ids[i:i + n]))
            i += n
        pieces.append(d.flush())
        assert "".join(pieces) == " ".join(TEXTS)
        assert not any("\ufffd" in p for p in pieces)


def test_bytes_that_never_decode_go_out_lossily(enc):
    """A token holding only the first bytes of a character, repeated: no character ever completes,
    so after MAX_HELD tokens they go out as U+FFFD rather than wait for ever."""
    first_half = enc.encode(" 🎉")[0]
    assert "\ufffd" in enc.decode([first_half])
    d = Detokenizer(enc)
    out = [d.push([first_half]) for _ in range(MAX_HELD)]
    assert out[:-1] == [""] * (MAX_HELD - 1) and "\ufffd" in out[-1]
    assert d.flush() == ""


def test_flush_sends_what_is_held(enc):
    d = Detokenizer(enc)
    first_half = enc.encode(" 🎉")[0]
    assert d.push(enc.encode("ok") + [first_half]) == "ok"
    assert "\ufffd" in d.flush() and d.flush() == ""
