# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""JSON from untrusted input, with its nesting bounded before it is parsed.

json.loads recurses once per level of arrays and objects and dies with a RecursionError (not a
ValueError: a 500, not a 400) on 100,000 `[`. Every parser of untrusted JSON checks the depth
first, here, without recursing: the agents' request parser (agents/wsgi.py) and JSON carried in
string fields (compose_file, vm_config, event logs...).
"""

import itertools
import json
import re

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

MAX_JSON_DEPTH = 64
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_A_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text):
    """How deep the arrays and objects of a JSON text nest, counted without recursing.

    Strings are taken out first (as a JSON lexer reads them, so brackets in them do not count);
    what is left is only brackets, summed in C loops. On invalid JSON the count may be too high,
    never too low for what a parser reads before it fails: a refusal either way.
    """
    brackets = _NOT_A_BRACKET_RE.sub("", _STRING_RE.sub("", text))
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def check_depth(text, field, max_depth=MAX_JSON_DEPTH):
    """DstackError(field) when the JSON text nests deeper than max_depth."""
    # No text nests deeper than its number of opening brackets: most need no count at all.
    if text.count("[") + text.count("{") > max_depth and json_depth(text) > max_depth:
        raise DstackError(field, f"nests deeper than {max_depth} levels of arrays and objects")


def loads(raw, field, max_depth=MAX_JSON_DEPTH, hint=""):
    """JSON from bytes (UTF-8/16/32, as json.loads reads them) or text, depth checked first.
    Every failure is a DstackError naming the field (`hint` is added to the invalid-JSON one)."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode(json.detect_encoding(raw), "surrogatepass")
        except (UnicodeDecodeError, LookupError):
            raise DstackError(field, "is not valid JSON: not UTF-8 text") from None
    if not isinstance(raw, str):
        raise DstackError(field, f"must be JSON text, not {type(raw).__name__}")
    check_depth(raw, field, max_depth)
    try:
        value = json.loads(raw)
    except ValueError:
        raise DstackError(field, "is not valid JSON" + hint) from None
    if "\\u" in raw or not raw.isascii():
        try:  # a "\ud800" escape decodes to a lone surrogate, which no later .encode() accepts
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DstackError(field, "holds a string that is not valid Unicode (a lone surrogate)") from None
    return value
