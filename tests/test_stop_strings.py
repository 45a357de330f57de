"""Incremental stop-string scanning against decoding everything at once.

The tokens here are byte pieces, so characters are split over tokens (as byte-level BPE and
byte-fallback tokenizers do) and tokens carry several characters.
"""

from __future__ import annotations

import numpy as np
import pytest

from knapspec.errors import KnapSpecError
from knapspec.stop_strings import StopStringScanner

# token id -> bytes: ASCII letters, multi-letter pieces, and the halves of "é" and "€"
PIECES = [b"a", b"b", b"ab", b"ba", b"xyz", b" ", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac",
          b"\xe2", b"\x82\xac"]


class Counting:
    """A byte-level decoder that counts the tokens it is given."""

    def __init__(self) -> None:
        self.tokens = 0

    def __call__(self, ids) -> str:
        self.tokens += len(ids)
        return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


UNITS = [[0], [1], [2], [3], [4], [5], [6, 7], [8, 9], [10, 11]]  # whole characters


def _valid_stream(rng: np.random.Generator, n: int) -> list[int]:
    """At least ``n`` token ids whose bytes form valid UTF-8 (split characters completed)."""
    out: list[int] = []
    while len(out) < n:
        out += UNITS[int(rng.integers(len(UNITS)))]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_scanner_text_equals_full_decode_at_every_step(seed):
    rng = np.random.default_rng(seed)
    tokens = _valid_stream(rng, 120)
    decode = Counting()
    scan = StopStringScanner(decode, ["zz"])  # never in the text
    step = 0
    while step < len(tokens):
        step = min(len(tokens), step + int(rng.integers(1, 6)))  # rounds of 1..5 tokens
        assert scan.extend(tokens[:step]) is None
        # a character split over tokens is held back until complete, never shown half
        assert scan.text == decode(tokens[:step]).removesuffix("\ufffd")
        assert "\ufffd" not in scan.text


def test_stop_string_across_a_split_character():
    scan = StopStringScanner(Counting(), ["\u00e9b"])
    assert scan.extend([0, 6]) is None  # "a" + half of "é"
    assert scan.text == "a" and scan.safe_tokens() == 0  # as far as it knows, "a" may start one
    assert scan.extend([0, 6, 7]) is None
    k = scan.extend([0, 6, 7, 1, 0])
    assert k == 1 and scan.tokens_before(k) == 1


def test_stop_rule_keeps_the_tokens_covering_the_text_before_it():
    decode = Counting()
    scan = StopStringScanner(decode, ["yzb"])
    tokens = [0, 4, 1, 2]  # "a" "xyz" "b" "ab": the stop begins inside token 1
    assert scan.extend(tokens[:2]) is None
    # a stop not found yet begins at character 2 or later, so "a" and "xyz" are kept anyway
    assert scan.safe_tokens() == 2
    k = scan.extend(tokens)
    assert scan.text[:k] == "ax"
    assert scan.tokens_before(k) == 2  # "a" and "xyz" cover "ax"; later tokens are dropped
    assert scan.tokens_before(0) == 0


def test_safe_tokens_never_exceed_what_a_later_stop_keeps():
    rng = np.random.default_rng(7)
    for _ in range(200):
        tokens = [int(t) for t in rng.integers(0, 6, size=12)]
        stop = Counting()(tokens[5:8])[:3] or "a"
        scan = StopStringScanner(Counting(), [stop])
        safe = 0
        for i in range(1, len(tokens) + 1):
            k = scan.extend(tokens[:i])
            if k is not None:
                assert scan.tokens_before(k) >= safe
                break
            assert scan.safe_tokens() >= safe  # monotone
            safe = scan.safe_tokens()


def test_decoding_work_is_linear():
    decode = Counting()
    scan = StopStringScanner(decode, ["zzz"])
    tokens = [0, 1, 5] * 400
    for i in range(0, len(tokens), 3):
        assert scan.extend(tokens[: i + 3]) is None
    assert decode.tokens <= 2 * (StopStringScanner.WINDOW + 1) * len(tokens)


@pytest.mark.parametrize("stops", ["stop", [""], [3]])
def test_bad_stop_strings(stops):
    with pytest.raises(KnapSpecError, match="stop strings"):
        StopStringScanner(Counting(), stops)
