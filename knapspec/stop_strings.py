"""Stop strings over a growing token sequence, in constant work per token.

The decoder adds a few tokens per round.  Decoding the whole sequence every round to look
for stop strings costs time quadratic in its length, so ``StopStringScanner`` keeps the text
decoded so far and finds each new token's text by decoding a short window: the ``WINDOW``
tokens before it, and it, minus what the window alone decodes to (the method of the
incremental detokenisers of vLLM and text-generation-inference).  Text that ends in an
incomplete UTF-8 character (decoded as U+FFFD) is held back until a later token completes
it, so a character split over byte tokens is never seen twice or half.

The rule for which tokens a stop keeps: when a stop string begins at character ``k`` of the
text, the tokens kept are the shortest prefix whose text covers ``text[:k]``; a token in
which the stop string begins is therefore kept (its text up to the stop is part of the
result), and no later token is.  ``safe_tokens`` says how many tokens can be streamed now
without ever streaming one that a later stop would drop.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence

from .errors import KnapSpecError

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


class StopStringScanner:
    """Incremental text of generated tokens, and the first stop string in it.

    Args:
        decode: token ids -> text (the backend's ``decode``).
        stops: the stop strings (non-empty strings); none: the scanner only keeps the text.
    """

    WINDOW = 6  # tokens of left context decoded with each new token (merges, byte pieces)

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]) -> None:
        if isinstance(stops, str) or any(not isinstance(s, str) or not s for s in stops):
            raise KnapSpecError(f"stop strings must be non-empty strings, got {stops!r}")
        self.decode = decode
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)  # characters
        self.text = ""  # text of tokens[:read]
        self.read = 0  # tokens whose text is complete in ``text``
        self.ends: list[int] = []  # ends[i]: len(text) once token i is read (non-decreasing)
        self._scanned = 0  # characters of text already searched for stop strings

    def extend(self, tokens: Sequence[int]) -> int | None:
        """Read ``tokens[len(self.ends):]`` (the new ones; earlier ones must be unchanged).

        Returns:
            the character index in ``text`` where the earliest stop string begins, or None.
        """
        for i in range(len(self.ends), len(tokens)):
            lo = max(0, self.read - self.WINDOW)
            before = self.decode(tokens[lo : self.read])
            window = self.decode(tokens[lo : i + 1])
            if len(window) > len(before) and not window.endswith(REPLACEMENT):
                self.text += window[len(before) :]
                self.read = i + 1
            self.ends.append(len(self.text))
        # a stop string not found before must end in the new text
        start = max(0, self._scanned - self.longest + 1)
        self._scanned = len(self.text)
        found = [k for k in (self.text.find(s, start) for s in self.stops) if k >= 0]
        return min(found) if found else None

    def tokens_before(self, k: int) -> int:
        """How many tokens cover ``text[:k]``: the shortest prefix whose text reaches ``k``."""
        return 0 if k <= 0 else bisect_left(self.ends, k) + 1

    def safe_tokens(self) -> int:
        """Tokens that no later stop can drop: a stop not found yet begins at or after
        ``len(text) - longest + 1``, and ``tokens_before`` of that is at least this."""
        first_possible = len(self.text) - self.longest + 1
        if not self.stops:
            return len(self.ends)
        if first_possible <= 0:
            return 0
        return min(len(self.ends), bisect_right(self.ends, first_possible - 1) + 1)
