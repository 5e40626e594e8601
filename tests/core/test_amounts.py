"""Strict money and count input: what a person writes is accepted, anything that could overflow or
explode later is refused with the rule, and stored values from older versions read as unset."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.core.amounts import AmountError, parse_count, parse_usd, stored_count, stored_usd


@pytest.mark.parametrize("value, expected", [
    (0, Decimal(0)), (25, Decimal(25)), ("12.50", Decimal("12.50")), (".5", Decimal("0.5")), ("5.", Decimal(5)),
    (Decimal("12.5"), Decimal("12.5")), (Decimal("1e-05"), Decimal("0.00001")), (10**9, Decimal(10**9)),
    ("0.000000000001", Decimal("1e-12")), ("1000000000.000000000000", Decimal(10**9)),
])
def test_plain_amounts_are_read_exactly(value: object, expected: Decimal) -> None:
    assert parse_usd(value) == expected


@pytest.mark.parametrize("value", [
    "1e999999999", "1e-999999999", "1e-99999999", "1E3", "1_000", "\u0663", " 5 ", "5 ", "+5", "-1", -1, Decimal("-0.5"),
    "NaN", "nan", "Infinity", "-Infinity", Decimal("NaN"), Decimal("Infinity"), Decimal("1e300"), Decimal("1e-13"),
    "0.0000000000001",
    10**9 + 1, "1000000000.01", "", ".", "0x10", True, False, None, [], {}, "1,000",
])
def test_anything_else_is_refused_with_the_rule(value: object) -> None:
    with pytest.raises(AmountError, match="from 0 to 1,000,000,000, at most 12 decimal places"):
        parse_usd(value)


def test_a_float_never_reaches_the_money_rules() -> None:
    # JSON API bodies and the YAML config parse decimals as Decimal; a float here is a parsing bug
    with pytest.raises(TypeError, match="float"):
        parse_usd(12.5)


@pytest.mark.parametrize("value", [-1, 10**9 + 1, 1.5, "5", True, None, 2**70])
def test_counts_are_whole_numbers_in_range(value: object) -> None:
    with pytest.raises(AmountError, match="whole number from 0 to 1,000,000,000"):
        parse_count(value)
    assert stored_count(value) is None


def test_counts_in_range_are_kept() -> None:
    assert parse_count(0) == 0 and parse_count(10**9) == 10**9 and stored_count(60) == 60


@pytest.mark.parametrize("stored", ["1e999999999", "1e-999999999", "NaN", "-1", "abc", "1" * 50, 2**70, "1E-13"])
def test_stored_values_that_break_the_rules_read_as_unset(stored: object) -> None:
    assert stored_usd(stored) is None


def test_stored_values_in_any_decimal_spelling_are_kept() -> None:
    assert stored_usd("1E-7") == Decimal("0.0000001")
    assert stored_usd("12.5") == Decimal("12.5")
    assert stored_usd(3) == Decimal(3)
