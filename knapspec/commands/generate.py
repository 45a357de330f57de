"""``knapspec generate``: self-speculative generation on a real model.

Example::

    knapspec generate "Explain speculative decoding in one paragraph."
    knapspec generate --prompt-file q.txt --strategy clasp --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import KnapSpecError
from ..stop_strings import StopStringScanner
from .common import add_backend_arguments, add_generation_arguments, add_planner_arguments

if TYPE_CHECKING:
    from ..decoding import GenerationResult

__all__ = ["add_backend_arguments", "add_parser", "read_prompt", "run", "summary_line"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with adaptive self-speculative decoding",
        description="Generate with self-speculative decoding; greedy output is identical to "
        "plain greedy decoding on the same backend.  Settings come from --config FILE "
        "(see 'knapspec config init'), overridden by flags.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file)")
    p.add_argument("--prompt-file", metavar="F", help="read the prompt from a file")
    add_backend_arguments(p)
    add_planner_arguments(p)
    add_generation_arguments(p)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with statistics")
    p.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file:
        raise KnapSpecError("give either a prompt or --prompt-file, not both")
    if args.prompt_file:
        path = Path(args.prompt_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KnapSpecError(f"prompt file not found: {path}") from None
        except UnicodeDecodeError:
            raise KnapSpecError(f"prompt file is not UTF-8 text: {path}") from None
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise KnapSpecError("no prompt: give PROMPT or --prompt-file")
    if not text.strip():
        raise KnapSpecError("the prompt is empty")
    return text


def run(args: argparse.Namespace) -> int:
    from ..runtime import build_session_from_config
    from .common import load_config

    text = read_prompt(args)
    settings = load_config(args)
    config = settings.generation_config()
    # before a first profile, say once what it is, how long it takes, where it is cached
    session = build_session_from_config(
        settings, notice=lambda line: sys.stderr.write(f"knapspec: {line}\n"))
    prompt = session.backend.encode(text, chat=not args.raw)
    reason = getattr(session.backend, "timing_only_reason", None)
    if reason:  # say it before the meaningless text streams out
        sys.stderr.write(f"knapspec: timing only: {reason}\n")
    if args.json:
        result = session.decoder.generate(prompt, config)
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    printed = 0
    shown: list[int] = []
    text = StopStringScanner(session.backend.decode, config.stop)  # decodes new tokens only
    stop_at: int | None = None

    def stream(new: list[int]) -> None:
        nonlocal printed, stop_at
        shown.extend(new)
        found = text.extend(shown)
        stop_at = found if stop_at is None else stop_at
        # hold back text that might still turn out to be a stop string: the last streamed
        # token may hold the start of one (the result's text ends before it)
        safe = len(text.text) - text.longest
        if stop_at is not None:
            safe = min(safe, stop_at)
        if safe > printed:
            sys.stdout.write(text.text[printed:safe])
            sys.stdout.flush()
            printed = safe

    result = session.decoder.generate(prompt, config, on_token=stream)
    sys.stdout.write(result.text[printed:] + "\n")
    sys.stderr.write(summary_line(result) + "\n")
    return 0


def summary_line(result: GenerationResult) -> str:
    """The line ``generate`` writes to stderr after the text: tokens, speed, and either
    how drafting went or why the generation decoded plainly; a second line says why the
    result is timing-only when it is (random weights, simulated acceptance)."""
    how = result.plain_reason or (f"acceptance {result.acceptance_rate:.2f}, "
                                  f"{result.mean_accepted_length:.2f} tokens/step")
    line = (f"[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tok/s, {how}, "
            f"stop: {result.stop_reason}]")
    if result.timing_only:
        line += f"\n[TIMING ONLY: {result.timing_only_reason or 'not a real model output'}]"
    return line
