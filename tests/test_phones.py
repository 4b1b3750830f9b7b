"""The precompiled phone validity check agrees with libphonenumber, and normalization keeps its semantics."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import PhoneNumber, PhoneNumberType
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from passbridge.phones import is_valid_nsn, split_national, to_e164


def library_valid(cc: int, nsn: str) -> bool:
    zeros = len(nsn) - len(nsn.lstrip("0"))
    number = PhoneNumber(
        country_code=cc,
        national_number=int(nsn),
        italian_leading_zero=zeros > 0 or None,
        number_of_leading_zeros=zeros if zeros > 1 else None,
    )
    return bool(phonenumbers.is_valid_number(number))


def samples(rng: random.Random) -> list[tuple[int, str]]:
    """Example numbers of every region and type, and mutations of them (digits changed, added, removed)."""
    out: list[tuple[int, str]] = []
    for cc, regions in COUNTRY_CODE_TO_REGION_CODE.items():
        for region in regions:
            for kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE, PhoneNumberType.TOLL_FREE):
                if region == "001":
                    example = phonenumbers.example_number_for_non_geo_entity(cc)
                else:
                    example = phonenumbers.example_number_for_type(region, kind)
                if example is None:
                    continue
                nsn = phonenumbers.national_significant_number(example)
                out.append((cc, nsn))
                for _ in range(6):
                    digits = list(nsn)
                    op = rng.randrange(3)
                    if op == 0:
                        digits[rng.randrange(len(digits))] = str(rng.randrange(10))
                    elif op == 1:
                        digits.insert(rng.randrange(len(digits) + 1), str(rng.randrange(10)))
                    elif len(digits) > 2:
                        del digits[rng.randrange(len(digits))]
                    out.append((cc, "".join(digits)))
    # plain random NANP and other shared-code numbers
    for _ in range(3000):
        cc = rng.choice([1, 7, 44, 39, 47, 61, 262, 590, 599])
        out.append((cc, "".join(str(rng.randrange(10)) for _ in range(rng.randrange(6, 12)))))
    return [(cc, nsn) for cc, nsn in out if nsn and nsn.isdigit()]


def test_agrees_with_libphonenumber() -> None:
    rng = random.Random(20261125)
    cases = samples(rng)
    assert len(cases) > 5000
    disagreements = [(cc, nsn) for cc, nsn in cases if is_valid_nsn(cc, nsn) != library_valid(cc, nsn)]
    assert disagreements == []
    assert sum(is_valid_nsn(cc, nsn) for cc, nsn in cases) > 1000  # both outcomes are exercised


@pytest.mark.parametrize(
    ("raw", "region", "e164"),
    [
        ("+14155550123", "US", "+14155550123"),
        ("(415) 555-0123", "US", "+14155550123"),
        ("020 7946 0018", "GB", "+442079460018"),
        ("+390612345678", "US", "+390612345678"),  # Italian fixed lines keep their leading zero
        ("+44 20 7946 0018", "US", "+442079460018"),
        # Non-ASCII digits (U+0660.. ARABIC-INDIC) are not E.164 as written: the parser normalizes them
        ("+1415555012\u0660", "US", "+14155550120"),
        ("+\u0661\u0664\u0661\u0665\u0665\u0665\u0665\u0660\u0661\u0662\u0663", "US", "+14155550123"),
        ("+14155550123\n", "US", "+14155550123"),
    ],
)
def test_to_e164(raw: str, region: str, e164: str) -> None:
    assert to_e164(raw, region) == e164


@pytest.mark.parametrize("raw", ["+1555", "12", "+999123456789", "not a phone", "+1415555012"])
def test_invalid_numbers_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="phone"):
        to_e164(raw, "US")


def library_e164(raw: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def national_samples(rng: random.Random) -> list[tuple[str, str]]:
    """National-format numbers of every region as people write them, and mutations of them."""
    out: list[tuple[str, str]] = []
    regions = sorted(phonenumbers.SUPPORTED_REGIONS)
    for region in regions:
        for kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            nsn = phonenumbers.national_significant_number(example)
            written = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
            out += [(written, region), (nsn, region), (f"({nsn[:3]}) {nsn[3:6]}-{nsn[6:]}", region)]
            for _ in range(4):
                digits = list(nsn)
                digits[rng.randrange(len(digits))] = str(rng.randrange(10))
                out.append(("".join(digits), region))
            out.append((str(example.country_code) + nsn, region))  # the calling code typed without "+"
            out.append(("00" + str(example.country_code) + nsn, region))  # with an IDD
    for _ in range(3000):
        region = rng.choice(["US", "GB", "DE", "FR", "IT", "BR", "IN", "MX", "AR", "RU", "JP", "AU", "CA"])
        digits = "".join(str(rng.randrange(10)) for _ in range(rng.randrange(3, 14)))
        out.append((digits, region))
        out.append((f"{digits[:3]}-{digits[3:]}", region))
    return out


def test_national_fast_path_agrees_with_the_parser() -> None:
    rng = random.Random(7)
    cases = national_samples(rng)
    fast = 0
    for raw, region in cases:
        split = split_national(raw, region)
        if split is None or not is_valid_nsn(*split):
            continue
        fast += 1
        assert to_e164(raw, region) == library_e164(raw, region), (raw, region)
    assert fast > 300  # the fast path is exercised in many regions
    for raw, region in cases:  # and overall the answers are the parser's
        expected = library_e164(raw, region)
        if expected is None:
            with pytest.raises(ValueError, match="phone"):
                to_e164(raw, region)
        else:
            assert to_e164(raw, region) == expected, (raw, region)
