"""WireGuard keys (plugins/module_utils/wireguard.py) against `wg` itself and RFC 7748."""

import base64
import shutil
import subprocess

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

needs_wg = pytest.mark.skipif(shutil.which("wg") is None,
                              reason="wg (wireguard-tools) is installed by scripts/setup.sh")

# RFC 7748 section 6.1: Alice's private scalar and public key.
RFC7748_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def b64(raw):
    return base64.b64encode(raw).decode()


def wg(*args, stdin=""):
    return subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True, check=True).stdout.strip()


def test_public_key_rfc7748_vector():
    assert wireguard.public_key(b64(RFC7748_PRIVATE)) == b64(RFC7748_PUBLIC)


@needs_wg
def test_public_key_matches_wg_pubkey_for_wg_genkey_keys():
    for _round in range(5):
        private = wg("genkey")
        assert wireguard.public_key(private) == wg("pubkey", stdin=private + "\n")


@needs_wg
def test_generated_keys_are_accepted_by_wg_and_agree():
    for _round in range(5):
        private = wireguard.generate_private_key()
        assert wireguard.public_key(private) == wg("pubkey", stdin=private + "\n")


@needs_wg
def test_unclamped_key_gives_wgs_answer():
    # All bits that clamping changes are wrong here: wg clamps before multiplying, and so must we.
    raw = b"\xff" * 31 + b"\x80"
    assert wireguard._clamp(raw) != raw  # pylint: disable=protected-access
    unclamped = b64(raw)
    assert wireguard.public_key(unclamped) == wg("pubkey", stdin=unclamped + "\n")
    assert wireguard.public_key(unclamped) == wireguard.public_key(b64(wireguard._clamp(raw)))  # pylint: disable=protected-access


def test_generate_private_key_is_clamped_and_fresh():
    keys = [wireguard.generate_private_key() for _key in range(64)]
    assert len(set(keys)) == 64
    for key in keys:
        assert len(key) == 44
        raw = base64.b64decode(key, validate=True)
        assert len(raw) == 32
        assert raw[0] & 7 == 0, "low 3 bits of the first byte cleared"
        assert raw[31] & 0x80 == 0, "bit 255 cleared"
        assert raw[31] & 0x40 == 0x40, "bit 254 set"


def test_clamp_matches_wg_genkey_rule():
    assert wireguard._clamp(b"\xff" * 32) == b"\xf8" + b"\xff" * 30 + b"\x7f"  # pylint: disable=protected-access
    assert wireguard._clamp(b"\x00" * 32) == b"\x00" * 31 + b"\x40"  # pylint: disable=protected-access


@pytest.mark.parametrize("value, reason", [
    ("", "44 base64 characters"),
    ("AAAA", "44 base64 characters"),
    (b64(b"\x01" * 33), "44 base64 characters"),
    ("!" * 43 + "=", "not base64"),
    (None, "base64 string"),
    (b"\x01" * 32, "base64 string"),
])
def test_bad_private_key_names_the_field(value, reason):
    with pytest.raises(DstackError) as info:
        wireguard.public_key(value)
    assert info.value.field == "private_key"
    assert reason in info.value.reason


def test_key_error_does_not_carry_the_key():
    # A key one character short: looks like a real secret, and must not be echoed back.
    secret = wireguard.generate_private_key()[:-2] + "="
    with pytest.raises(DstackError) as info:
        wireguard.public_key(secret)
    assert secret not in str(info.value) and secret[:20] not in str(info.value)
    with pytest.raises(DstackError) as info:
        wireguard.render_wg_quick(secret, "10.0.0.2", [])
    assert info.value.field == "private_key"
    assert secret[:20] not in str(info.value)


def test_parse_key_field_name_is_the_callers():
    with pytest.raises(DstackError) as info:
        wireguard.parse_key("nope", "servers[2].pk")
    assert str(info.value).startswith("servers[2].pk: ")
