"""vision_ft.errors.first_line: the one helper behind every one-line error message."""

from __future__ import annotations

from vision_ft.errors import first_line


def test_first_two_lines_joined_and_capped():
    assert first_line(ValueError("one\ntwo\nthree")) == "one two"
    assert first_line(ValueError("one\ntwo"), lines=1) == "one"
    assert len(first_line(ValueError("x" * 1000))) == 300


def test_empty_message_gives_the_type_name():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("  \n")) == "RuntimeError"


def test_root_cause_follows_the_chain():
    try:
        try:
            raise OSError("disk gone\ndetails")
        except OSError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as e:
        assert first_line(e) == "wrapper"
        assert first_line(e, root_cause=True, lines=1) == "disk gone"


def test_root_cause_stops_on_a_cycle():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert first_line(a, root_cause=True) in ("a", "b")


def test_backbones_re_export_the_same_function():
    from vision_ft.backbones import base

    assert base.first_line is first_line
