"""Encrypted env: the dstack byte layout, SDK interop, .env parsing, limits and filtering."""

import json
import os

import dstack_sdk
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, strategies as st

from ansible_collections.dstack.tee.plugins.module_utils import env_crypt as ec
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

SECRET = bytes(range(32))
PUBLIC = ec.x25519_public_key(SECRET)

env_names = st.from_regex(r"\A[a-zA-Z_][a-zA-Z0-9_]{0,20}\Z")
env_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=50)


@given(st.dictionaries(env_names, env_values, max_size=8))
def test_env_encrypted_by_the_sdk_decrypts_with_our_code(env):
    sealed = dstack_sdk.encrypt_env_vars_sync([dstack_sdk.EnvVar(k, v) for k, v in env.items()], PUBLIC.hex())
    assert ec.decrypt_env(bytes.fromhex(sealed), SECRET) == list(env.items())


def test_our_layout_is_eph_pub_iv_ciphertext_tag():
    items = [("A", "1"), ("B", "two words")]
    blob = ec.encrypt_env(items, PUBLIC)
    assert len(blob) == 32 + 12 + len(ec.env_plaintext(items)) + 16
    # Decrypt by hand with the documented recipe: AES-GCM keyed by the raw X25519 secret.
    shared = X25519PrivateKey.from_private_bytes(SECRET).exchange(
        ec.X25519PublicKey.from_public_bytes(blob[:32]))
    plain = AESGCM(shared).decrypt(blob[32:44], blob[44:], None)
    assert json.loads(plain) == {"env": [{"key": "A", "value": "1"}, {"key": "B", "value": "two words"}]}
    assert ec.decrypt_env(blob, SECRET) == items


def test_tampered_or_misdirected_env_is_refused():
    blob = bytearray(ec.encrypt_env([("A", "secret-value")], PUBLIC))
    blob[50] ^= 1
    with pytest.raises(DstackError, match="tampered") as err:
        ec.decrypt_env(bytes(blob), SECRET)
    assert "secret-value" not in str(err.value)
    with pytest.raises(DstackError, match="another key"):
        ec.decrypt_env(ec.encrypt_env([("A", "x")], PUBLIC), os.urandom(32))
    with pytest.raises(DstackError, match="shorter"):
        ec.decrypt_env(b"\x00" * 40, SECRET)


def test_dotenv_parsing():
    text = (
        "# comment\n\nexport A=1\nB = spaced value   # trailing comment\nC='single # kept'\n"
        'D="multi\\nline \\"quoted\\""\nE="spans\ntwo lines"\nF=\nG=a#b\n'
    )
    assert ec.parse_dotenv(text) == [
        ("A", "1"), ("B", "spaced value"), ("C", "single # kept"), ("D", 'multi\nline "quoted"'),
        ("E", "spans\ntwo lines"), ("F", ""), ("G", "a#b")]


@pytest.mark.parametrize("text, field, reason", [
    ("1BAD=x\n", "env_file.1BAD", "not a valid variable name"),
    ("OK=1\nOK=2\n", "env_file.OK", "given twice"),
    ("no equals sign\n", "env_file line 1", "KEY=value"),
    ('Q="never closed\n', "env_file line 1", "no closing"),
    ("A-B=1\n", "env_file.A-B", "not a valid variable name"),
])
def test_bad_dotenv_names_the_line_or_key(text, field, reason):
    with pytest.raises(DstackError) as err:
        ec.parse_dotenv(text)
    assert err.value.field == field and reason in err.value.reason


def test_limits():
    with pytest.raises(DstackError, match="at most 131072") as err:
        ec.env_items({"BIG": "v" * (128 * 1024 + 1)})
    assert err.value.field == "env.BIG"
    ec.env_items({"BIG": "v" * (128 * 1024)})
    with pytest.raises(DstackError, match="longer than 255"):
        ec.env_items({"K" * 256: "v"})
    ec.env_items({"K" * 255: "v"})
    with pytest.raises(DstackError, match="at most 1024"):
        ec.env_items({f"K{i}": "v" for i in range(1025)})
    with pytest.raises(DstackError, match="in all; at most 1048576"):
        ec.env_items({f"K{i}": "v" * 100_000 for i in range(11)})
    with pytest.raises(DstackError, match="string or a number"):
        ec.env_items({"A": None})
    assert ec.env_items({"N": 5}) == [("N", "5")]


def test_filter_drops_undeclared_keys_by_name():
    kept, dropped = ec.filter_allowed([("A", "1"), ("B", "2"), ("C", "3")], ["A", "C"])
    assert kept == [("A", "1"), ("C", "3")] and dropped == ["B"]


def test_wrong_public_key_length_and_non_hex():
    with pytest.raises(DstackError, match="must be 32 bytes") as err:
        ec.encrypt_env([("A", "1")], "ab" * 31)
    assert err.value.field == "public_key"
    with pytest.raises(DstackError, match="not hex"):
        ec.encrypt_env([("A", "1")], "zz" * 32)


def test_rendered_dotenv_is_shell_safe():
    import shlex
    items = [("A", "plain"), ("B", "it's $HOME; rm -rf /"), ("C", "")]
    text = ec.render_dotenv(items).decode()
    parsed = [line.split("=", 1) for line in text.splitlines()]
    assert [(k, shlex.split(v)[0] if v != "''" else "") for k, v in parsed] == items
    assert json.loads(ec.render_json(items)) == dict(items)
