"""dstack.tee.app_compose run as Ansible runs it: check mode, apply, idempotence, diff, refusals."""

import hashlib
import json

import dstack_sdk
import pytest

COMPOSE = "services:\n  web:\n    image: nginx\n    ports: ['8080:80']\n"


@pytest.fixture
def compose_file(tmp_path):
    path = tmp_path / "docker-compose.yaml"
    path.write_text(COMPOSE)
    return path


def test_check_apply_check_apply(module, tmp_path, compose_file):
    dest = tmp_path / "app-compose.json"
    args = {"compose_file": str(compose_file), "name": "hello", "dest": str(dest),
            "allowed_envs": ["A"], "mode": "0640"}

    first = module("app_compose", args, check=True, diff=True)
    assert first["changed"] is True and not dest.exists()
    assert "\nname: hello\n" in first["diff"]["after"] and first["diff"]["before"] == ""
    # The compose text line by line (YAML), not one escaped JSON string.
    assert "docker_compose_file: |\n  services:\n    web:\n      image: nginx\n" in first["diff"]["after"]

    applied = module("app_compose", args, diff=True)
    assert applied["changed"] is True
    data = dest.read_bytes()
    assert applied["compose_hash"] == hashlib.sha256(data).hexdigest()
    assert applied["compose_hash"] == dstack_sdk.get_compose_hash(json.loads(data))
    assert applied["app_id"] == applied["compose_hash"][:40]
    assert json.loads(data) == applied["app_compose"]
    assert oct(dest.stat().st_mode & 0o777) == "0o640"

    assert module("app_compose", args, check=True)["changed"] is False
    again = module("app_compose", args)
    assert again["changed"] is False and again["compose_hash"] == applied["compose_hash"]
    assert dest.read_bytes() == data


def test_a_changed_field_changes_the_file_and_the_diff_names_it(module, tmp_path, compose_file):
    dest = tmp_path / "app-compose.json"
    base = {"compose_file": str(compose_file), "name": "hello", "dest": str(dest)}
    one = module("app_compose", base)
    two = module("app_compose", dict(base, public_logs=True), diff=True)
    assert two["changed"] and two["compose_hash"] != one["compose_hash"]
    assert "-public_logs: false" in _unified(two["diff"]) and "+public_logs: true" in _unified(two["diff"])
    # A compose change shows as the changed compose line.
    compose_file.write_text(COMPOSE.replace("nginx", "caddy"))
    three = module("app_compose", dict(base, public_logs=True), diff=True)
    changed = [line for line in _unified(three["diff"]).splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ["-      image: nginx", "+      image: caddy"], changed


def _unified(diff):
    import difflib
    return "\n".join(difflib.unified_diff(diff["before"].splitlines(), diff["after"].splitlines(), lineterm=""))


def test_inline_compose_without_dest_only_computes(module):
    result = module("app_compose", {"compose": COMPOSE, "name": "web", "app_id": "0x" + "ab" * 20})
    assert result["changed"] is False and result["app_id"] == "ab" * 20 and "dest" not in result


@pytest.mark.parametrize("args, field, reason", [
    ({"compose": "services:\n  web: [oops\n"}, "compose", "not valid YAML at line"),
    ({"key_provider": "sgx"}, "key_provider", "unknown value 'sgx'"),
    ({"allowed_envs": ["BAD-NAME"]}, "allowed_envs", "not a valid variable name"),
    ({"key_provider_id": "xyz"}, "key_provider_id", "not hex"),
    ({"app_id": "abcd"}, "app_id", "must be 20 bytes"),
    ({"name": "bad/name"}, "name", "may hold only"),
])
def test_bad_input_fails_naming_the_field_and_writes_nothing(module, tmp_path, args, field, reason):
    dest = tmp_path / "app-compose.json"
    full = dict({"compose": COMPOSE, "name": "hello", "dest": str(dest)}, **args)
    result = module("app_compose", full)
    assert result.get("failed") is True
    assert result["msg"].startswith(field + ":") and reason in result["msg"]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_update_keeps_the_old_file(module, tmp_path, compose_file):
    dest = tmp_path / "app-compose.json"
    module("app_compose", {"compose_file": str(compose_file), "name": "hello", "dest": str(dest)})
    before = dest.read_bytes()
    compose_file.write_text("services: [broken\n")
    result = module("app_compose", {"compose_file": str(compose_file), "name": "hello", "dest": str(dest)})
    assert result["failed"] and result["msg"].startswith("compose_file:")
    assert dest.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "app-compose.json", "docker-compose.yaml"]


def test_missing_compose_file_and_missing_folder(module, tmp_path):
    result = module("app_compose", {"compose_file": str(tmp_path / "nope.yaml"), "name": "a"})
    assert result["failed"] and result["msg"].startswith("compose_file: cannot read")
    result = module("app_compose", {"compose": COMPOSE, "name": "a", "dest": str(tmp_path / "no" / "x.json")})
    assert result["failed"] and result["msg"].startswith("dest: the folder")


def test_app_yml_gives_every_app_compose_field_and_refuses_unknown_keys(module, tmp_path, compose_file):
    """app.yml, as roles/app passes it: any app-compose field (secure_time, public_tcbinfo, port_policy,
    ... not only a few), its name and ports skipped, an option given to the module winning."""
    spec = tmp_path / "app.yml"
    spec.write_text("name: ignored-here\nports: [{host_port: 8080, vm_port: 80}]\nallowed_envs: [A]\n"
                    "secure_time: true\npublic_tcbinfo: false\nport_policy: {restrict_mode: true, ports: []}\n")
    base = {"compose_file": str(compose_file), "name": "hello", "app_yml": str(spec)}
    app = module("app_compose", base)["app_compose"]
    assert app["name"] == "hello" and app["allowed_envs"] == ["A"] and app["secure_time"] is True
    assert app["public_tcbinfo"] is False and app["port_policy"] == {"restrict_mode": True, "ports": []}
    assert module("app_compose", dict(base, secure_time=False))["app_compose"]["secure_time"] is False
    # The same app.yml read by verify_app's one reader gives the same compose_hash.
    from ansible_collections.dstack.tee.plugins.module_utils import app_compose  # pylint: disable=import-outside-toplevel
    _name, options = app_compose.app_yml_options(spec.read_text())
    assert app_compose.compose_hash(app_compose.render(app_compose.build(COMPOSE, "hello", **options))) == \
        module("app_compose", base)["compose_hash"]
    # No app.yml: no options. An unknown key, or a field of the wrong type: refused, named.
    assert module("app_compose", dict(base, app_yml=str(tmp_path / "none.yml")))["app_compose"]["allowed_envs"] == []
    spec.write_text("allowed_envs: [A]\nsecure_tme: true\n")
    refused = module("app_compose", base)
    assert refused["failed"] and refused["field"] == "secure_tme" and "not an app-compose field" in refused["msg"]
    spec.write_text("public_logs: sometimes\n")
    bad_type = module("app_compose", base)
    assert bad_type["failed"] and bad_type["field"] == "public_logs", bad_type
