"""app-compose.json: bytes, compose_hash against the dstack SDK, ids, and refusals."""

import copy
import hashlib
import json

import dstack_sdk
import pytest
from hypothesis import given, settings, strategies as st

from ansible_collections.dstack.tee.plugins.module_utils import app_compose as ac
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

COMPOSE = "services:\n  web:\n    image: nginx\n"

# Field names the SDK's AppCompose object can carry (it drops names starting with "_" and
# would shadow its own methods).
names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: not s.startswith("_") and s not in ("to_dict", "from_dict", "runner", "docker_config"))
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=20)
           | st.floats(allow_nan=True, allow_infinity=True))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
app_dicts = st.builds(
    lambda extra, runner, compose: dict(extra, runner=runner, docker_compose_file=compose),
    st.dictionaries(names, values, max_size=8),
    st.sampled_from(["docker-compose", "bash", "x"]),
    st.text(max_size=40))


@settings(max_examples=300)
@given(app_dicts)
def test_compose_hash_equals_the_sdk(app):
    ours = ac.compose_hash(ac.render(app))
    assert ours == dstack_sdk.get_compose_hash(copy.deepcopy(app))


def test_the_generated_dicts_cover_what_the_issue_names():
    # The property above runs over dicts with unicode, nesting, booleans, numbers and empties;
    # this pins a hand-made one with each, so a regression shows a readable case too.
    app = {"runner": "docker-compose", "name": "日本語 ✓", "nested": {"b": [1, 2.5, {"z": None}], "a": {}},
           "flag": True, "off": False, "n": -7, "empty": "", "list": [], "nan": float("nan")}
    assert ac.compose_hash(app) == dstack_sdk.get_compose_hash(copy.deepcopy(app))
    # Top-level NaN is left out like None, as the SDK does; nested None stays null.
    assert ac.render(app).decode().startswith('{"empty":"","flag":true,"list":[],"n":-7,"name":"日本語 ✓","nested":{"a":{},"b":[1,2.5,{"z":null}]}')


def test_render_is_deterministic_and_independent_of_key_order():
    one = ac.build(COMPOSE, "hello", allowed_envs=["A", "B"])
    two = dict(reversed(list(one.items())))
    assert ac.render(one) == ac.render(two)
    assert b" " not in ac.render({"a": 1, "b": [1, 2]})


def test_build_writes_every_default_field():
    app = ac.build(COMPOSE, "hello")
    for field, value in ac.DEFAULTS.items():
        assert app[field] == value
    assert app["docker_compose_file"] == COMPOSE
    assert not set(ac.OPTIONAL_FIELDS) & set(app)


def test_key_provider_sets_the_booleans():
    assert ac.build(COMPOSE, "a", key_provider="none")["kms_enabled"] is False
    local = ac.build(COMPOSE, "a", key_provider="local")
    assert (local["kms_enabled"], local["local_key_provider_enabled"]) == (False, True)
    assert ac.build(COMPOSE, "a", kms_enabled=False)["key_provider"] == "none"
    assert ac.key_provider_of({"kms_enabled": True}) == "kms"
    assert ac.key_provider_of({"local_key_provider_enabled": True}) == "local"
    assert ac.key_provider_of({}) == "none"


def test_app_id_and_instance_id():
    chash = hashlib.sha256(b"x").hexdigest()
    assert ac.app_id_for(chash) == chash[:40]
    assert ac.app_id_for(chash, "0x" + "ab" * 20) == "ab" * 20
    seed, app = bytes(range(20)), bytes(range(20, 40))
    assert ac.instance_id_for(seed.hex(), app.hex()) == hashlib.sha256(seed + app).digest()[:20].hex()


def test_mrconfigid_v1_and_v2():
    from eth_hash.auto import keccak
    chash = hashlib.sha256(b"x").digest()
    v1 = ac.mrconfigid_v1(chash.hex())
    assert len(v1) == 48 and v1[0] == 1 and v1[1:33] == chash and v1[33:] == bytes(15)
    app_id, kp_id = bytes(range(20)), bytes.fromhex("aabb")
    v2 = ac.mrconfigid_v2(chash.hex(), app_id.hex(), "kms", kp_id.hex())
    assert v2 == b"\x02" + keccak(chash + app_id + b"\x02" + kp_id) + bytes(15)
    app = ac.build(COMPOSE, "a", key_provider_id="aabb")
    assert ac.mrconfigid(app, app_id.hex())[0] == 2
    assert ac.mrconfigid(ac.build(COMPOSE, "a"), app_id.hex())[0] == 1


@pytest.mark.parametrize("text, field, reason", [
    ("services:\n  web: [unclosed\n", "compose", "not valid YAML at line"),
    ("services: {}\n", "compose", "no `services`"),
    ("- a list\n", "compose", "mapping"),
    ("", "compose", "empty"),
])
def test_bad_compose_is_refused_naming_the_field(text, field, reason):
    with pytest.raises(DstackError) as err:
        ac.parse_compose_yaml(text, field)
    assert err.value.field == field and reason in err.value.reason


@pytest.mark.parametrize("options, field", [
    ({"key_provider": "sgx"}, "key_provider"),
    ({"runner": "podman"}, "runner"),
    ({"allowed_envs": ["1BAD"]}, "allowed_envs"),
    ({"allowed_envs": ["A", "A"]}, "allowed_envs"),
    ({"key_provider_id": "zz"}, "key_provider_id"),
    ({"storage_fs": "btrfs"}, "storage_fs"),
    ({"swap_size": "lots"}, "swap_size"),
    ({"manifest_version": True}, "manifest_version"),
    ({"kms_enabled": "yes"}, "kms_enabled"),
    ({"key_provider": "none", "kms_enabled": True}, "kms_enabled"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_options_are_refused_naming_the_field(options, field):
    with pytest.raises(DstackError) as err:
        ac.build(COMPOSE, "a", **options)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_bad_name_is_refused():
    with pytest.raises(DstackError, match="^name:"):
        ac.build(COMPOSE, "a/b")


def test_parse_reads_back_what_render_wrote():
    app = ac.build(COMPOSE, "hello")
    assert ac.parse(ac.render(app)) == app
    with pytest.raises(DstackError, match="not valid JSON"):
        ac.parse(b"{")
    assert json.loads(ac.render(app))["name"] == "hello"
