"""Exact quantities: usage is carried as integer micro-units, never as binary floats.

A meter value is quantized to six decimal places once, when its event is ingested; every sum
after that is integer arithmetic, so totals, ledger values and rounding carries are exact.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

MICROS = 1_000_000
MAX_MICROS = 10**18
"""The most usage, either way, one event may carry and one org's meter may total in one
bucket: 10^12 units. Every running total then stays a signed 64-bit integer, as storage keeps
it: a bucket total, a ledger row (the difference of two totals) and a rounding carry (which
keeps only the fraction below one unit, never a lifetime sum)."""
_QUANTUM = Decimal("0.000001")


def to_micros(value: Decimal | int) -> int:
    """Quantize an exact value to integer micro-units (half-even at the sixth decimal)."""
    if isinstance(value, int):
        return value * MICROS
    return int(value.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN).scaleb(6))


def from_micros(micros: int) -> Decimal:
    """The exact decimal value of `micros` micro-units."""
    return Decimal(micros).scaleb(-6)


def format_micros(micros: int) -> str:
    """`micros` as a plain decimal string without trailing zeros: 1500000 -> '1.5'."""
    text = f"{from_micros(micros):f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def floor_units(micros: int) -> int:
    """Whole billing units in `micros` micro-units, rounded toward minus infinity."""
    return micros // MICROS


PICOS = 10**12
"""A gauge's level is kept in integer pico-units (1 byte is 10^-9 GB, exactly); its integral
over time, in pico-unit milliseconds, is integer arithmetic until one rounding per bucket."""
_PICO = Decimal("1e-12")


def to_picos(value: Decimal | int) -> int:
    """Quantize an exact value to integer pico-units (half-even at the twelfth decimal)."""
    if isinstance(value, int):
        return value * PICOS
    return int(value.quantize(_PICO, rounding=ROUND_HALF_EVEN).scaleb(12))


def div_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator (> 0) rounded half to even, exactly."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2):
        quotient += 1
    return quotient
