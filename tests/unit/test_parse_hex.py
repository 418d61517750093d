"""parse_hex, the hex parsing every format shares: what it accepts and the error for each refusal."""

import pytest

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex


@pytest.mark.parametrize("value, kwargs, expected", [
    ("00ff", {}, b"\x00\xff"),
    ("0xABcd", {}, b"\xab\xcd"),
    ("0X01", {}, b"\x01"),
    ("  0a0b \n", {}, b"\x0a\x0b"),
    (b"raw", {}, b"raw"),
    (bytearray(b"\x01\x02"), {"length": 2}, b"\x01\x02"),
    ("", {"allow_empty": True}, b""),
    ("0x", {"allow_empty": True}, b""),
    ("", {"length": 0}, b""),
    ("", {"length": (0, 20), "allow_empty": True}, b""),
    ("11" * 20, {"length": (0, 20)}, b"\x11" * 20),
    ("22" * 48, {"length": 48}, b"\x22" * 48),
    ("22" * 48, {"length": (48,)}, b"\x22" * 48),
])
def test_accepted(value, kwargs, expected):
    data = parse_hex(value, "field", **kwargs)
    assert data == expected and type(data) is bytes  # pylint: disable=unidiomatic-typecheck


@pytest.mark.parametrize("value, kwargs, message", [
    (None, {}, "field: must be a hex string, not NoneType"),
    (12, {}, "field: must be a hex string, not int"),
    (memoryview(b"ab"), {}, "field: must be a hex string, not memoryview"),
    ("abc", {}, "field: is not hex: odd number of digits (3)"),
    ("0xabc", {}, "field: is not hex: odd number of digits (3)"),
    ("zz", {}, "field: is not hex: it has characters outside 0-9 and a-f"),
    ("ab cd", {}, "field: is not hex: odd number of digits (5)"),
    ("ab  cd", {}, "field: is not hex: it has characters outside 0-9 and a-f"),
    ("\u00e9\u00e9", {}, "field: is not hex: it has characters outside 0-9 and a-f"),
    ("", {}, "field: must not be empty"),
    (b"", {"length": 32}, "field: must not be empty"),
    ("", {"length": (0, 20)}, "field: must not be empty"),
    ("ab", {"length": 32}, "field: must be 32 bytes (64 hex digits), got 1 bytes"),
    ("ab" * 49, {"length": (48,)}, "field: must be 48 bytes (96 hex digits), got 49 bytes"),
    ("ab" * 3, {"length": (0, 20), "allow_empty": True}, "field: must be 0 or 20 bytes (0 hex digits), got 3 bytes"),
    (b"x" * 5, {"length": [4, 6]}, "field: must be 4 or 6 bytes (8 hex digits), got 5 bytes"),
])
def test_refused_naming_the_field_and_the_reason(value, kwargs, message):
    with pytest.raises(DstackError) as err:
        parse_hex(value, "field", **kwargs)
    assert str(err.value) == message and err.value.field == "field"
