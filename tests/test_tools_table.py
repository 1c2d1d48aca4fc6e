"""The tools' table cells: one line each, cut with a mark, and nothing a terminal would act on."""

from __future__ import annotations

from worker.tools.table import LAST_COLUMN_MAX, cell


def test_a_cell_is_one_line_cut_with_a_mark() -> None:
    assert cell("a\nb\tc", 8) == "a b c   "
    assert cell("abcdefghij", 5) == "abcd…"
    assert cell("abcdefghij", 5, cut=False) == "abcdefghij"
    assert len(cell("x" * 500, 0)) == LAST_COLUMN_MAX


def test_terminal_escapes_from_a_message_are_shown_not_acted_on() -> None:
    """An API's error text or a dead letter's header reached the operator's terminal as it was:
    an ESC sequence could recolour, move the cursor, rewrite earlier rows or set the title."""
    hostile = "refused\x1b[2J\x1b]0;pwned\x07\x9b31m\x7fend"
    shown = cell(hostile, 0)
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in shown)
    assert shown.startswith("refused?[2J?]0;pwned??31m?end")
