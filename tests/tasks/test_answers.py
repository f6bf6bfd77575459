"""Number parsing shared by the built-in tasks: forms, canonical text, bounds on hostile text."""

import pytest

from recpipe.tasks import answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", "7"),
        (" 7.\n", "7"),
        ("1,234", "1234"),
        ("-3", "-3"),
        ("3.0", "3"),
        ("3.50", "3.5"),
        ("$5", "5"),
        ("-$5", "-5"),
        ("007", "7"),
        ("-0", "0"),
        ("1,234.50", "1234.5"),
    ],
)
def test_canonical_number_forms(text, expected):
    assert answers.canonical_number(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "7 8", "seven", "٣", "３", "1e5", "3 + 4", "None", "nan", "7!"])
def test_not_a_bare_number(text):
    assert answers.canonical_number(text) is None


def test_numbers_in_text_keep_minus_signs_apart_from_subtraction():
    text = "3-4 is -1, and 1,234 or 1,2345 costs $5."
    assert [answers.canonical(m) for m in answers.numbers(text)] == ["3", "4", "-1", "1234", "1", "2345", "5"]


def test_unicode_digits_are_not_numbers():
    # Arabic-Indic, Devanagari, full-width: only ASCII digits count (documented in answers.py).
    assert answers.numbers("٣ ३ ３ 𝟕") == []


def test_long_text_is_parsed_by_head_and_tail_only():
    text = "1 " + "x" * (10 * answers.MAX_PARSE_CHARS) + " 2 3"
    clipped = answers.clip(text)
    assert len(clipped) == answers.MAX_PARSE_CHARS + 1
    assert [answers.canonical(m) for m in answers.numbers(clipped)] == ["1", "2", "3"]
    assert answers.clip("short") == "short"


def test_huge_number_compares_as_text():
    huge = "1" + "0" * 5000  # str(10**5000) itself raises in Python 3.11 (4300-digit limit): text only here
    assert answers.canonical_number(huge) == huge
    assert answers.canonical_number(huge + ".000") == huge
