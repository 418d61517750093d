# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one error type of the dstack formats, the hex parsing every format shares, and the last
line of a command's output that an error message quotes."""

import binascii


class DstackError(ValueError):
    """Bad input or a failed check.

    The message names the field and the reason. It never carries the value of a secret, so it is
    safe to show to a user or write to a log.
    """

    def __init__(self, field, reason):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def last_line(text):
    """The last non-blank line of a command's output, at most 300 characters (for an error message)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def parse_hex(value, field, length=None, allow_empty=False):
    """Return the bytes of a hex string (an optional 0x prefix is accepted).

    `length`, when given, is the exact byte length required (an int or a tuple of allowed ints).
    The error names the field and what is wrong, never the value itself.
    """
    # Strings first, lengths compared as ints before any tuple is made: ~25 calls per key release.
    if isinstance(value, str):
        text = value.strip()
        if text[:2] in ("0x", "0X"):
            text = text[2:]
        # binascii takes only pairs of ASCII hex digits (no spaces, unlike bytes.fromhex), in C: a
        # regular expression over a 10 KB quote cost ~0.1 ms.
        try:
            data = binascii.unhexlify(text)
        except ValueError:
            if len(text) % 2:
                raise DstackError(field, f"is not hex: odd number of digits ({len(text)})") from None
            raise DstackError(field, "is not hex: it has characters outside 0-9 and a-f") from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise DstackError(field, f"must be a hex string, not {type(value).__name__}")
    if not data and not allow_empty and length != 0:
        raise DstackError(field, "must not be empty")
    if length is not None and len(data) != length:
        allowed = (length,) if isinstance(length, int) else tuple(length)
        if len(data) not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise DstackError(field, f"must be {want} bytes ({2 * allowed[0]} hex digits), got {len(data)} bytes")
    return data
