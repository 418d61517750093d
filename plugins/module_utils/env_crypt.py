# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Encrypted env (dstack-reference 6.3): .env parsing, limits, encryption, decryption, filtering.

Layout of `.encrypted-env`: eph_pub(32) || iv(12) || ciphertext || tag(16). The AES-256-GCM key
is the raw X25519 shared secret (no KDF), no AAD. The plaintext is {"env":[{"key","value"},...]}.
Errors name the variable or line, never a value.
"""

import json
import os
import re
import shlex

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
except ImportError:  # reported by callers through HAS_CRYPTOGRAPHY
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

ENV_KEY_RE = re.compile(r"\A[a-zA-Z_][a-zA-Z0-9_]*\Z")
MAX_KEY_BYTES = 255
MAX_VALUE_BYTES = 128 * 1024
MAX_ITEMS = 1024
MAX_TOTAL_BYTES = 1024 * 1024
EPH_PUB_LEN = 32
IV_LEN = 12
TAG_LEN = 16

_DOTENV_LINE = re.compile(r"\A\s*(?:export\s+)?([^=\s]+)\s*=\s*(.*?)\s*\Z", re.S)
_DQ_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$"}


def parse_dotenv(text, field="env_file"):
    """[(key, value)] from .env text: KEY=value, export KEY=value, '#' comments, quoted values.

    Double-quoted values may span lines and know \\n \\r \\t \\" \\\\ escapes; single-quoted
    values are literal; an unquoted value ends at ' #'.
    """
    items = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _DOTENV_LINE.match(line)
        if not match:
            raise DstackError(f"{field} line {lineno}", "is not KEY=value")
        key, raw = match.group(1), match.group(2)
        if raw[:1] in ('"', "'"):
            quote = raw[0]
            body = raw[1:]
            # A quoted value may continue on the next lines until its closing quote.
            while _closing_quote(body, quote) < 0 and i < len(lines):
                body += "\n" + lines[i]
                i += 1
            end = _closing_quote(body, quote)
            if end < 0:
                raise DstackError(f"{field} line {lineno}", f"the value of {key} has no closing {quote}")
            rest = body[end + 1:].strip()
            if rest and not rest.startswith("#"):
                raise DstackError(f"{field} line {lineno}", f"unexpected text after the quoted value of {key}")
            body = body[:end]
            value = _unescape_dq(body) if quote == '"' else body
        else:
            value = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
        items.append((key, value))
    return check_env(items, field)


def _closing_quote(body, quote):
    escaped = False
    for pos, char in enumerate(body):
        if quote == '"' and char == "\\" and not escaped:
            escaped = True
            continue
        if char == quote and not escaped:
            return pos
        escaped = False
    return -1


def _unescape_dq(body):
    return re.sub(r"\\(.)", lambda m: _DQ_ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


def env_items(env, field="env"):
    """[(key, value)] from a dict, a list of {key, value} / (key, value), or .env text; checked."""
    if isinstance(env, str):
        return parse_dotenv(env, field)
    if isinstance(env, dict):
        items = list(env.items())
    elif isinstance(env, (list, tuple)):
        items = []
        for pos, entry in enumerate(env):
            if isinstance(entry, dict) and set(entry) == {"key", "value"}:
                items.append((entry["key"], entry["value"]))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                items.append(tuple(entry))
            else:
                raise DstackError(f"{field}[{pos}]", "must be {key, value} or a (key, value) pair")
    else:
        raise DstackError(field, f"must be a mapping of names to values, not {type(env).__name__}")
    return check_env(items, field)


def check_env(items, field="env"):
    """Apply dstack's rules: key regex and length, value and total sizes, item count, no repeats."""
    if len(items) > MAX_ITEMS:
        raise DstackError(field, f"has {len(items)} variables; at most {MAX_ITEMS} are allowed")
    seen = set()
    checked = []
    for key, value in items:
        if not isinstance(key, str) or not ENV_KEY_RE.match(key):
            shown = str(key)[:64]
            raise DstackError(f"{field}.{shown}", "is not a valid variable name: it must match "
                              "^[a-zA-Z_][a-zA-Z0-9_]*$")
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise DstackError(f"{field}.{key[:32]}...", f"the name is longer than {MAX_KEY_BYTES} bytes")
        if key in seen:
            raise DstackError(f"{field}.{key}", "is given twice")
        seen.add(key)
        if isinstance(value, bool) or value is None:
            raise DstackError(f"{field}.{key}", "the value must be a string or a number")
        if isinstance(value, (int, float)):
            value = str(value)
        if not isinstance(value, str):
            raise DstackError(f"{field}.{key}", f"the value must be a string, not {type(value).__name__}")
        size = len(value.encode("utf-8"))
        if size > MAX_VALUE_BYTES:
            raise DstackError(f"{field}.{key}", f"the value is {size} bytes; at most {MAX_VALUE_BYTES} are allowed")
        checked.append((key, value))
    total = len(env_plaintext(checked))
    if total > MAX_TOTAL_BYTES:
        raise DstackError(field, f"is {total} bytes in all; at most {MAX_TOTAL_BYTES} are allowed")
    return checked


def env_plaintext(items):
    """The JSON plaintext dstack encrypts: {"env":[{"key":K,"value":V},...]}."""
    return json.dumps({"env": [{"key": k, "value": v} for k, v in items]},
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def x25519_public_key(secret):
    """The X25519 public key (32 bytes) of a 32-byte secret."""
    key = X25519PrivateKey.from_private_bytes(parse_hex(secret, "env_crypt_key", length=32))
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encrypt_env(items, public_key):
    """Encrypt checked env items to an app's X25519 env public key: eph_pub||iv||ciphertext||tag."""
    pub = X25519PublicKey.from_public_bytes(parse_hex(public_key, "public_key", length=32))
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(pub)
    iv = os.urandom(IV_LEN)
    sealed = AESGCM(shared).encrypt(iv, env_plaintext(items), None)
    eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return eph_pub + iv + sealed


def decrypt_env(blob, env_crypt_key, field="encrypted_env"):
    """[(key, value)] from .encrypted-env bytes and the app's env_crypt_key (32-byte X25519 secret)."""
    if len(blob) < EPH_PUB_LEN + IV_LEN + TAG_LEN:
        raise DstackError(field, f"is {len(blob)} bytes, shorter than the {EPH_PUB_LEN + IV_LEN + TAG_LEN}-byte minimum")
    secret = X25519PrivateKey.from_private_bytes(parse_hex(env_crypt_key, "env_crypt_key", length=32))
    eph_pub = X25519PublicKey.from_public_bytes(blob[:EPH_PUB_LEN])
    iv = blob[EPH_PUB_LEN:EPH_PUB_LEN + IV_LEN]
    try:
        plain = AESGCM(secret.exchange(eph_pub)).decrypt(iv, blob[EPH_PUB_LEN + IV_LEN:], None)
    except (InvalidTag, ValueError):
        raise DstackError(field, "does not decrypt: it was tampered with or encrypted to another key") from None
    try:
        doc = json.loads(plain)
        entries = doc["env"]
        if not isinstance(entries, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise DstackError(field, "decrypts, but is not {\"env\": [{\"key\", \"value\"}, ...]}") from None
    return env_items(entries, field)


def filter_allowed(items, allowed_envs):
    """(kept items, dropped names): keys not in allowed_envs are dropped, as dstack does."""
    allowed = set(allowed_envs or ())
    kept = [(k, v) for k, v in items if k in allowed]
    dropped = [k for k, _value in items if k not in allowed]
    return kept, dropped


def render_dotenv(items):
    """`.decrypted-env`: shell-safe KEY=value lines (values quoted when they need it)."""
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in items).encode("utf-8")


def render_json(items):
    """`.decrypted-env.json`: {KEY: value}."""
    return json.dumps(dict(items), ensure_ascii=False, sort_keys=True).encode("utf-8")
