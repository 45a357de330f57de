"""Real text for tests, shipped in ``tests/data`` (sources and licences: its README.md).

Tests that need natural-language prompts read them here, so they run on every clone instead
of skipping where ``../shared/data`` is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SPECBENCH = DATA / "specbench_qa3.jsonl"
BOOK = DATA / "pg84_40000-52000.txt"  # Frankenstein, characters 40,000-52,000


def specbench_prompts(n: int, categories: tuple[str, ...] = ("mt_bench", "qa")) -> list[str]:
    """First turns of the first ``n`` shipped Spec-Bench questions of ``categories``.

    Raises ``ValueError`` when fewer than ``n`` are shipped (cut more into ``tests/data``).
    """
    rows = [json.loads(line) for line in SPECBENCH.read_text(encoding="utf-8").splitlines()]
    picked = [r["turns"][0] for r in rows if r["category"] in categories][:n]
    if len(picked) < n:
        raise ValueError(f"{SPECBENCH} holds {len(picked)} prompts of {categories}, "
                         f"a test asked for {n}")
    return picked


def book_text(chars: int) -> str:
    """The first ``chars`` characters of the shipped book excerpt (12,000 characters).

    Raises ``ValueError`` when the excerpt is shorter, rather than handing a test a prompt
    with fewer tokens than it asked for.
    """
    text = BOOK.read_text(encoding="utf-8")
    if chars > len(text):
        raise ValueError(f"{BOOK} has {len(text)} characters, a test asked for {chars}")
    return text[:chars]
