"""app-compose's custom_domains (ours): the names an app asks the gateway to terminate with their own
certificates. Written in one form and only when set, so that every app without it keeps the
compose_hash dstack computes; errors name the entry (in app.yml, with the file)."""

import copy

import dstack_sdk
import pytest

from ansible_collections.dstack.tee.plugins.module_utils import app_compose as ac
from ansible_collections.dstack.tee.plugins.module_utils import app_folder
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

COMPOSE = "services:\n  web:\n    image: nginx\n"


def test_an_app_without_custom_domains_keeps_dstacks_bytes_and_hash():
    plain = ac.build(COMPOSE, "shop")
    for empty in (None, []):
        same = ac.build(COMPOSE, "shop", custom_domains=empty)
        assert ac.render(same) == ac.render(plain) and "custom_domains" not in same
    assert b"custom_domains" not in ac.render(plain)
    assert ac.compose_hash(plain) == dstack_sdk.get_compose_hash(copy.deepcopy(plain))


def test_entries_are_written_in_one_form_and_hashed_as_dstack_hashes_any_field():
    app = ac.build(COMPOSE, "shop", custom_domains=["Shop.Example.COM.", {"domain": "api.example.com", "port": 8080}])
    assert app["custom_domains"] == [{"domain": "shop.example.com", "port": 80},
                                     {"domain": "api.example.com", "port": 8080}]
    assert b'"custom_domains":[{"domain":"shop.example.com","port":80},{"domain":"api.example.com","port":8080}]' \
        in ac.render(app)
    assert ac.compose_hash(app) == dstack_sdk.get_compose_hash(copy.deepcopy(app))
    # The gateway reads the same list back from the bytes.
    assert ac.custom_domains(ac.parse(ac.render(app))) == app["custom_domains"]
    assert ac.custom_domains({}) == []


@pytest.mark.parametrize("entries, field, reason", [
    ("shop.example.com", "custom_domains", "must be a list"),
    ([3], "custom_domains[0]", "must be {domain: NAME, port: PORT}"),
    (["ok.example.com", "*.example.com"], "custom_domains[1].domain", "is a wildcard"),
    (["localhost"], "custom_domains[0].domain", "is not a DNS name"),
    (["10.0.0.1"], "custom_domains[0].domain", "is not a DNS name"),
    (["bad_name.example.com"], "custom_domains[0].domain", "is not a DNS name"),
    ([{"domain": "a.example.com", "port": 0}], "custom_domains[0].port", "must be a port number"),
    ([{"domain": "a.example.com", "port": "80"}], "custom_domains[0].port", "must be a port number"),
    ([{"domain": "a.example.com", "tls": True}], "custom_domains[0].tls", "is not a custom_domains field"),
    (["a.example.com", "A.example.com."], "custom_domains[1].domain", "is declared twice"),
    ([f"n{i}.example.com" for i in range(ac.MAX_CUSTOM_DOMAINS + 1)], "custom_domains", "at most"),
])
def test_bad_entries_are_named(entries, field, reason):
    with pytest.raises(DstackError) as err:
        ac.build(COMPOSE, "shop", custom_domains=entries)
    assert err.value.field == field and reason in err.value.reason


def test_app_yml_custom_domains_errors_name_the_file_and_the_entry(tmp_path):
    (tmp_path / "docker-compose.yaml").write_text(COMPOSE)
    (tmp_path / "app.yml").write_text("custom_domains:\n  - shop.example.com\n  - domain: api.example.com\n    port: 99999\n")
    with pytest.raises(DstackError) as err:
        app_folder.read(str(tmp_path))
    assert err.value.field == f"{tmp_path}/app.yml: custom_domains[1].port"
    (tmp_path / "app.yml").write_text("custom_domains:\n  - shop.example.com\n  - domain: api.example.com\n    port: 8080\n")
    assert app_folder.read(str(tmp_path)).app_compose["custom_domains"] == [
        {"domain": "shop.example.com", "port": 80}, {"domain": "api.example.com", "port": 8080}]
