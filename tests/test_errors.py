"""The entry points' error reporting: one `error:` line on stderr and the error's own exit code."""

import pytest

from nanogpt.errors import (
    ArgumentParser,
    NanoGPTError,
    StorageError,
    StoppedWithAnotherRank,
    first_line,
    reported_errors,
)


@pytest.mark.parametrize("error, code", [(NanoGPTError("bad --x; pass 1"), 2), (StorageError("disk full; free"), 3)])
def test_reported_errors_print_one_line_and_exit_with_the_errors_code(capsys, error, code):
    with pytest.raises(SystemExit) as exit_info:
        with reported_errors():
            raise error
    assert exit_info.value.code == code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_a_rank_stopped_by_another_ranks_error_exits_without_printing_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with reported_errors():
            raise StoppedWithAnotherRank("bad weights (on another rank)")
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""  # the rank that saw it reports it


def test_reported_errors_leave_other_exceptions_and_a_clean_exit_alone():
    with reported_errors():
        pass  # nothing raised: no exit
    with pytest.raises(KeyError):
        with reported_errors():
            raise KeyError("a bug, not a user's mistake: its traceback is wanted")


def test_argument_parser_mistakes_are_one_line_exit_2(capsys):
    p = ArgumentParser(prog="nanogpt-x")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(["--m", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments: --m 1") and err.count("\n") == 1


def test_first_line():
    assert first_line(ValueError("one\ntwo")) == "one"
    assert first_line(ValueError()) == "ValueError"
