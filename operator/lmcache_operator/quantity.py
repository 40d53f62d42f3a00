"""Kubernetes resource quantities: parse, and print in the API server's canonical form.

The operator compares what it wants with what the server stores; printing quantities the way
the server canonicalizes them ("1536Mi", not "1.5Gi") keeps that comparison free of churn.
"""

import re
from fractions import Fraction

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_PATTERN = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$"
)

GIB = 1 << 30


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity."""


def parse(value: str | int | float) -> Fraction:
    """The exact value of a quantity such as "16Gi", "500m", "1e3" or a bare number."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        return Fraction(value)
    match = _PATTERN.match(value.strip())
    if not match:
        raise QuantityError(f"{value!r} is not a quantity (e.g. 16Gi, 500m, 4)")
    number, exponent, suffix = match.groups()
    mantissa = Fraction(number)
    if exponent:
        return mantissa * Fraction(10) ** int(exponent[1:])
    if suffix in _BINARY:
        return mantissa * 1024 ** _BINARY[suffix]
    return mantissa * Fraction(10) ** _DECIMAL[suffix or ""]


def is_binary(value: str | int | float) -> bool:
    return isinstance(value, str) and value.strip()[-2:] in _BINARY


def format_binary(value: Fraction | int) -> str:
    """Canonical BinarySI form: the largest power-of-1024 suffix with an integer mantissa."""
    value = Fraction(value)
    if value.denominator != 1 or value < 1024:
        return format_decimal(value)
    n, power = int(value), 0
    while n % 1024 == 0 and power < 6:
        n //= 1024
        power += 1
    suffix = {v: k for k, v in _BINARY.items()}.get(power, "")
    return f"{n}{suffix}"


def format_decimal(value: Fraction | int) -> str:
    """Canonical DecimalSI form; like the API server, rounds up to a whole milli-unit."""
    value = Fraction(value)
    milli = -(-value * 1000 // 1)  # ceil
    if milli % 1000:
        return f"{milli}m"
    n, exp = int(milli // 1000), 0
    while n and n % 1000 == 0 and exp < 18:
        n //= 1000
        exp += 3
    suffix = {v: k for k, v in _DECIMAL.items()}[exp]
    return f"{n}{suffix}"


def canonical(value: str | int | float) -> str:
    """What the API server stores for this quantity."""
    parsed = parse(value)
    return format_binary(parsed) if is_binary(value) else format_decimal(parsed)
