"""Find and compare final numeric answers in free model text, in bounded time.

Rules shared by the built-in tasks:
- A number is ASCII digits only: "1,234" (thousands commas), "-3", "3.0", "$5", "-$5", "1,234.50".
  Unicode digits ("٣", "３") are not numbers here: the gold answers are ASCII, and accepting other
  scripts would widen what a response can match without helping any realistic answer.
- Numbers compare by canonical text: sign, commas and "$" normalised, leading zeros and trailing
  fractional zeros dropped ("3.0" == "3", "-0" == "0", "007" == "7"). Pure string work: nothing in a
  response is ever evaluated, and a 5000-digit number costs what its length costs (no int/float
  conversion, which is either limited to 4300 digits or rounds).
- Bounded time: a response longer than MAX_PARSE_CHARS is parsed as its first and last
  MAX_PARSE_CHARS // 2 characters joined by a newline (the answer of a sane response is near
  one of its ends). Every regex here is linear (no nested quantifiers), and context checks look
  at a fixed-size window around each number, so scoring is O(MAX_PARSE_CHARS) per response.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from recpipe.tasks.base import TaskError

MAX_PARSE_CHARS = 8192  # ~2k tokens; head and tail halves are kept, the middle of longer text is skipped
_CONTEXT_CHARS = 24  # how far before / after a number its cue ("answer is", "=", "####") is looked for

# sign? dollar? (thousands-grouped | plain digits) fraction?
# The lookbehind keeps "3-4" as 3 and 4, not 3 and -4. re.ASCII makes [0-9] and \s ASCII-only.
_NUMBER = r"(?<![0-9])(?P<sign>-?)\$?(?P<int>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?P<frac>\.[0-9]+)?"
NUMBER_RE = re.compile(_NUMBER, re.ASCII)
_BARE_NUMBER_RE = re.compile(r"\s*" + _NUMBER + r"\.?\s*", re.ASCII)


def clip(text: str) -> str:
    """The part of `text` that gets parsed: all of it, or its head and tail when it is long."""
    if len(text) <= MAX_PARSE_CHARS:
        return text
    half = MAX_PARSE_CHARS // 2
    return text[:half] + "\n" + text[-half:]


def canonical(match: re.Match[str]) -> str:
    """Canonical text of a number found by NUMBER_RE / `numbers`."""
    int_part = match.group("int").replace(",", "").lstrip("0") or "0"
    frac = (match.group("frac") or "").rstrip("0").rstrip(".")
    text = int_part + frac
    if match.group("sign") and text != "0":
        text = "-" + text
    return text


def canonical_number(text: str) -> str | None:
    """Canonical form of `text` if it is exactly one number (surrounding spaces, a final "." allowed)."""
    match = _BARE_NUMBER_RE.fullmatch(text)
    return canonical(match) if match else None


def gold_number(answer: str) -> str:
    """Canonical form of a prompt's gold answer ("1,234" -> "1234"); ValueError if it is not one number."""
    number = canonical_number(answer) if isinstance(answer, str) else None
    if number is None:
        raise TaskError(f"prompt.answer={answer!r:.80}: expected one number, e.g. '42' or '-3.5'")
    return number


def is_bare_number(text: str) -> bool:
    """True when the (clipped) response is just a number, e.g. "7", " 7.\\n", "$1,234"."""
    return canonical_number(clip(text)) is not None


def numbers(text: str) -> list[re.Match[str]]:
    """Every number in the clipped text, in order (the matches index into clip(text))."""
    return list(NUMBER_RE.finditer(text))


def before(text: str, match: re.Match[str]) -> str:
    """The few characters in front of a number: where cues like "answer is" or "####" sit."""
    return text[max(0, match.start() - _CONTEXT_CHARS) : match.start()]


def after(text: str, match: re.Match[str]) -> str:
    """The few characters behind a number: tells "3 + 4" (an expression) from "7." (a result)."""
    return text[match.end() : match.end() + _CONTEXT_CHARS]


def cued_answer(text: str, cues: Sequence[re.Pattern[str]], *, latest_first: bool,
                accept: Callable[[str, re.Match[str]], bool] | None = None) -> str | None:
    """The canonical number a response gives as its answer: the first number (in text order, or from the end
    with ``latest_first``) that a cue precedes, trying the cues in order and skipping numbers ``accept``
    rejects; else the last number; None when there is none. Each task's cues and order are its rules."""
    text = clip(text)
    found = numbers(text)
    if not found:
        return None
    for cue in cues:
        for match in reversed(found) if latest_first else found:
            if (accept is None or accept(text, match)) and cue.search(before(text, match)):
                return canonical(match)
    return canonical(found[-1])
