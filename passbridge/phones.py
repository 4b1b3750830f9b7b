"""Phone numbers to E.164, as libphonenumber (the ``phonenumbers`` package) judges them, made cheap for E.164 input.

``phonenumbers.is_valid_number`` recompiles-through-a-cache and re-walks its metadata on every call (~20 µs);
an ingest of tens of thousands of events per second cannot afford that. :func:`is_valid_nsn` gives the same
answer from the same metadata, with each region's patterns compiled once: for a country calling code and the
national significant number (the digits after the code, leading zeros included) it is
``phonenumbers.is_valid_number(PhoneNumber(cc, nsn))``, step for step (region choice for shared calling codes,
the general pattern, then the per-type patterns with their possible lengths). ``tests/test_phones.py`` checks
the equivalence over many numbers of many countries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import phonenumbers
from phonenumbers import PhoneMetadata
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

# re.ASCII everywhere: a str pattern's \d matches any Unicode digit (e.g. U+0660) and int() reads them, so
# "+1415555012\u0660" would pass as E.164 and be stored unchanged. Non-ASCII digits go to the parser instead,
# which normalizes them. (fullmatch: "$" would also let a final "\n" through.)
_E164 = re.compile(r"\+[1-9]\d{6,14}", re.ASCII)
_NON_GEO = "001"
#: libphonenumber's order in ``_number_type_helper``; fixed line and mobile are handled after these.
_SPECIAL_TYPES = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
)


@dataclass(frozen=True, slots=True)
class _Desc:
    lengths: frozenset[int]  # empty: any length
    pattern: re.Pattern[str]

    def matches(self, nsn: str) -> bool:
        if self.lengths and len(nsn) not in self.lengths:
            return False
        return self.pattern.fullmatch(nsn) is not None


@dataclass(frozen=True, slots=True)
class _Region:
    leading_digits: re.Pattern[str] | None
    general: _Desc | None
    types: tuple[_Desc, ...]  # any match makes the number valid

    def valid(self, nsn: str) -> bool:
        if self.general is None or not self.general.matches(nsn):
            return False
        return any(d.matches(nsn) for d in self.types)


def _desc(desc: object) -> _Desc | None:
    pattern = getattr(desc, "national_number_pattern", None)
    if not pattern:  # an absent or empty pattern matches nothing in libphonenumber
        return None
    return _Desc(frozenset(getattr(desc, "possible_length", None) or ()), re.compile(pattern, re.ASCII))


@cache
def _region(country_code: int, region: str) -> _Region | None:
    if region == _NON_GEO:
        metadata = PhoneMetadata.metadata_for_nongeo_region(country_code, None)
    else:
        metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
    if metadata is None:
        return None
    # Validity is "some type matches", so the order is free: the common types go first.
    types = [_desc(metadata.fixed_line)]
    # libphonenumber only tries the mobile pattern when it differs from the fixed-line one.
    if not metadata.same_mobile_and_fixed_line_pattern:
        types.append(_desc(metadata.mobile))
    types += [_desc(getattr(metadata, name)) for name in _SPECIAL_TYPES]
    leading = metadata.leading_digits
    return _Region(
        re.compile(leading, re.ASCII) if leading is not None else None,
        _desc(metadata.general_desc),
        tuple(d for d in types if d is not None),
    )


def is_valid_nsn(country_code: int, nsn: str) -> bool:
    """``phonenumbers.is_valid_number`` for the number ``+<country_code><nsn>`` (see the module docstring)."""
    regions = COUNTRY_CODE_TO_REGION_CODE.get(country_code)
    if not regions:
        return False
    if len(regions) == 1:
        rules = _region(country_code, regions[0])
        return rules is not None and rules.valid(nsn)
    for region in regions:  # a shared calling code (+1, +7, +44, ...): find the region first
        rules = _region(country_code, region)
        if rules is None:
            continue
        if rules.leading_digits is not None:
            if rules.leading_digits.match(nsn):
                return rules.valid(nsn)
        elif rules.valid(nsn):
            return True
    return False


def split_e164(value: str) -> tuple[int, str] | None:
    """``(country calling code, national significant number)`` of ``+<digits>``, or ``None``."""
    if not _E164.fullmatch(value):
        return None
    digits = value[1:]
    for width in (1, 2, 3):  # calling codes are prefix-free: at most one width names a known code
        code = int(digits[:width])
        if code in COUNTRY_CODE_TO_REGION_CODE:
            return code, digits[width:]
    return None


_SIMPLE_NATIONAL = re.compile(r"^[0-9 ().\-]+$")
_NOT_DIGIT = re.compile(r"\D", re.ASCII)


@dataclass(frozen=True, slots=True)
class _National:
    country_code: int
    idd: re.Pattern[str] | None  # the region's international (IDD) prefix
    national_prefix: re.Pattern[str] | None  # national_prefix_for_parsing


@cache
def _national(region: str) -> _National | None:
    metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
    if metadata is None or metadata.country_code is None:
        return None
    npfp = metadata.national_prefix_for_parsing
    idd = metadata.international_prefix
    return _National(
        metadata.country_code,
        re.compile(idd, re.ASCII) if idd else None,
        re.compile(npfp, re.ASCII) if npfp else None,
    )


def split_national(value: str, region: str) -> tuple[int, str] | None:
    """``(calling code, national significant number)`` of a plainly written national number, or ``None``.

    Only for input of digits, spaces and ``().-`` whose digits ``phonenumbers.parse(value, region)`` would
    take as they are: they start neither with the region's international prefix, nor with its calling code,
    nor with a national prefix to strip, and their count is a possible NSN length. For such input the parser's
    steps (extract, no extension, no country code, no prefix stripped) leave exactly those digits as the
    national significant number; anything else returns ``None`` and goes to the parser.
    """
    if not _SIMPLE_NATIONAL.match(value):
        return None
    rules = _national(region)
    if rules is None:
        return None
    digits = _NOT_DIGIT.sub("", value)
    if not 3 <= len(digits) <= 17:
        return None
    if rules.idd is not None and rules.idd.match(digits):
        return None
    if digits.startswith(str(rules.country_code)):
        return None
    if rules.national_prefix is not None and rules.national_prefix.match(digits):
        return None
    return rules.country_code, digits


def to_e164(value: str, default_region: str) -> str:
    """``value`` in E.164 if libphonenumber deems it valid; raises ``ValueError`` with the reason otherwise.

    E.164 input valid as written is returned as is, and plainly written national numbers are read as
    :func:`split_national` explains, both checked with :func:`is_valid_nsn`. Anything else (and anything
    those paths find invalid, so that the reason comes from the parser) goes through ``phonenumbers.parse``
    (in ``default_region`` unless it starts with ``+``).
    """
    split = split_e164(value)
    if split is not None and is_valid_nsn(*split):
        return value
    if split is None and (national := split_national(value, default_region)) is not None:
        code, nsn = national
        if is_valid_nsn(code, nsn):
            return f"+{code}{nsn}"
    try:
        number = phonenumbers.parse(value, None if value.startswith("+") else default_region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc}") from None
    if number.country_code is None or not is_valid_nsn(
        number.country_code, phonenumbers.national_significant_number(number)
    ):
        raise ValueError("not a valid phone number for its region")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
