"""Every numeric flag of every method is validated when the command line is parsed.

A value out of range must be one `error:` line naming the flag (exit 2), not a ZeroDivisionError or a
torch traceback hours into a run. The test walks each method's full parser, so a flag added later with a
bare `type=int` / `type=float` fails here.
"""
import argparse
import math

import pytest

from conftest import TOY_FAST, run_script
from uda import common
from uda.common import UserError
from uda.methods import METHODS

from uda.flags import build_parser

CANDIDATES = ("0", "-1", "nan", "inf")  # the invalid values a type may reject
ALWAYS_INVALID = ("-1", "nan", "inf")   # no flag of a run takes a negative or an infinite number


def numeric_actions(parser):
    """The parser's flags that take numbers: a numeric type, or a number (or list of numbers) as default."""
    found = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action.default, bool) or action.nargs == 0:
            continue  # positional, store_true / BooleanOptionalAction, --help
        default = action.default if isinstance(action.default, (list, tuple)) else [action.default]
        numeric_default = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in default)
        if action.type in (int, float) or is_validating(action.type) or numeric_default:
            found.append(action)
    return found


def is_validating(kind):
    """One of uda/common.py's argparse types (positive_int, fraction, int_at_least(n), ...)."""
    return callable(kind) and getattr(kind, "__module__", None) == common.__name__


def rejected(kind):
    """The candidate values `kind` itself refuses."""
    out = []
    for text in CANDIDATES:
        try:
            kind(text)
        except argparse.ArgumentTypeError:
            out.append(text)
    return out


def method_flag_names(method):
    """The option strings the method's own add_arguments adds (not train.py's common flags)."""
    parser = common.ArgumentParser()
    METHODS[method].add_arguments(parser)
    return {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}


def split_actions(method):
    parser = build_parser(method)
    own = method_flag_names(method)
    actions = numeric_actions(parser)
    return parser, [a for a in actions if a.option_strings[0] in own], [a for a in actions if a.option_strings[0] not in own]


def argv_for(action, text):
    count = action.nargs if isinstance(action.nargs, int) else 1
    return ["--out", "unused", action.option_strings[0], *[text] * count]


def check_actions(parser, actions):
    """Each flag has a validating type that refuses -1, nan and inf, and its parser turns every value the
    type refuses into one UserError line naming the flag; its default passes the type."""
    for action in actions:
        flag = action.option_strings[0]
        assert action.choices is None or all(isinstance(c, int) for c in action.choices), flag
        if action.choices is not None:
            continue  # an explicit list of values (--synthia-classes 16/19) validates itself
        assert is_validating(action.type), f"{flag}: type {action.type!r} is not one of uda/common.py's checked types"
        bad = rejected(action.type)
        assert set(ALWAYS_INVALID) <= set(bad), f"{flag} accepts one of {ALWAYS_INVALID}: it rejects only {bad}"
        for text in bad:
            with pytest.raises(UserError) as err:
                parser.parse_args(argv_for(action, text))
            message = str(err.value)
            assert flag in message and repr(text) in message and "\n" not in message, message
        defaults = action.default if isinstance(action.default, (list, tuple)) else [action.default]
        for value in defaults:
            if value is not None:
                assert action.type(str(value)) == value or math.isclose(action.type(str(value)), value), flag


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_flag_is_validated_at_parse_time(method):
    parser, own, _ = split_actions(method)
    check_actions(parser, own)
    if method != "source_only":
        assert own, f"{method}: no numeric flag found (is the walk broken?)"


def test_zero_is_refused_where_it_means_nothing():
    """0 of a count, an interval, a temperature, a learning rate is an error; 0 of a weight is 'off'."""
    parser = build_parser("dida")
    for flag in ("--dida-bank-interval", "--dida-bank-size", "--dida-temperature"):
        with pytest.raises(UserError, match=flag):
            parser.parse_args(["--out", "x", flag, "0"])
    args = parser.parse_args(["--out", "x", "--dida-lambda-ins", "0", "--dida-gather-alpha", "1"])
    assert (args.dida_lambda_ins, args.dida_gather_alpha) == (0, 1)
    for flag, value in (("--plca-agg-alpha", "1"), ("--dida-bank-momentum", "1"), ("--cdga-groups", "1")):
        method = flag.split("-")[2]
        with pytest.raises(UserError, match=flag):
            build_parser(method).parse_args(["--out", "x", flag, value])


def test_common_flags_are_validated_at_parse_time():
    parser, _, common_actions = split_actions("source_only")
    check_actions(parser, common_actions)


@pytest.mark.slow
def test_bad_value_is_one_error_line_and_exit_2(tmp_path):
    """The real command: exit code 2 and a single `error:` line, no traceback (was a ZeroDivisionError)."""
    result = run_script("train.py", "--method", "dida", "--out", tmp_path / "run", *TOY_FAST,
                        "--dida-bank-interval", "0")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "--dida-bank-interval" in lines[0]
    assert not (tmp_path / "run").exists()
