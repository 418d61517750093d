"""The pure parts of verify_app: app URLs, the .localhost rule, an app folder read as roles/app reads it."""

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import app_compose, app_verify, attestation, gateway_http
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

APP_ID = "0123456789abcdef0123456789abcdef01234567"
COMPOSE = "services:\n  web:\n    image: nginx\n"


@pytest.mark.parametrize("url, suffix, base, port, worker", [
    (f"https://{APP_ID}.dstack.localhost:8443", "", "dstack.localhost", 8443,
     f"https://{APP_ID}-8090.dstack.localhost:8443"),
    (f"https://{APP_ID}.apps.example.com/", "", "apps.example.com", 443, f"https://{APP_ID}-8090.apps.example.com"),
    (f"https://{APP_ID.upper()}-8080.example.com", "8080", "example.com", 443, f"https://{APP_ID}-8090.example.com"),
    (f"https://{APP_ID}-443s.example.com:9443", "443s", "example.com", 9443, f"https://{APP_ID}-8090.example.com:9443"),
    (f"https://{APP_ID}-50051g.example.com", "50051g", "example.com", 443, f"https://{APP_ID}-8090.example.com"),
])
def test_app_urls(url, suffix, base, port, worker):
    parsed = gateway_http.parse_app_url(url)
    assert (parsed.id, parsed.suffix, parsed.base_domain, parsed.port) == (APP_ID, suffix, base, port)
    assert parsed.worker_url == worker
    assert parsed.host == (f"{APP_ID}-{suffix}.{base}" if suffix else f"{APP_ID}.{base}")


@pytest.mark.parametrize("url, words", [
    ("", "is required"),
    (f"http://{APP_ID}.example.com", "must be an https:// URL"),
    (f"https://{APP_ID}.example.com/page", "no path"),
    (f"https://{APP_ID}.example.com/?q=1", "no path, query"),
    (f"https://user@{APP_ID}.example.com", "or user"),
    (f"https://{APP_ID}", "is not <id>.<base_domain>"),
    ("https://gateway.example.com", "is not an app_id or instance_id"),
    (f"https://{APP_ID[:-2]}.example.com", "40 hex digits"),
    (f"https://{APP_ID}-80x.example.com", "is not <id>-<port>[s|g]"),
    (f"https://{APP_ID}-70000.example.com", "is not <id>-<port>[s|g]"),
    (f"https://{APP_ID}-80-81.example.com", "is not <id>-<port>[s|g]"),
    (f"https://{APP_ID}.example.com:99999", "is not a URL"),
])
def test_bad_app_urls_name_the_option(url, words):
    with pytest.raises(DstackError) as err:
        gateway_http.parse_app_url(url)
    assert err.value.field == "app_url" and words in err.value.reason


@pytest.mark.parametrize("host, address", [
    ("localhost", "127.0.0.1"), ("a.dstack.localhost", "127.0.0.1"), ("A.DSTACK.LOCALHOST.", "127.0.0.1"),
    ("example.com", "example.com"), ("localhost.example.com", "localhost.example.com"),
    ("notlocalhost", "notlocalhost"),
])
def test_localhost_names_connect_to_loopback(host, address):
    assert gateway_http.connect_address(host) == address


def test_a_missing_ca_file_names_ca_cert(tmp_path):
    with pytest.raises(DstackError) as err:
        gateway_http.ssl_context(str(tmp_path / "none.crt"))
    assert err.value.field == "ca_cert" and "none.crt" in err.value.reason


def _hash(name, **options):
    return app_compose.compose_hash(app_compose.render(app_compose.build(COMPOSE, name, **options)))


def test_an_app_folder_is_read_as_roles_app_reads_it(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "docker-compose.yaml").write_text(COMPOSE)
    # No app.yml: the folder's name, dstack's defaults.
    assert app_verify.local_app(app_dir=str(folder) + "/").compose_hash == _hash("shop")
    # app.yml: its name and every app-compose field it sets (as the app_compose module's app_yml
    # reads it for the role); ports (the VMM's) are not in the deployed app-compose.json.
    (folder / "app.yml").write_text("name: web\nallowed_envs: [A]\npublic_logs: true\nsecure_time: true\n"
                                    "ports: [{host_port: 8080, vm_port: 80}]\n")
    local = app_verify.local_app(app_dir=str(folder))
    assert local.name == "web" and local.compose_hash == _hash("web", allowed_envs=["A"], public_logs=True,
                                                               secure_time=True)
    # Options given to the module win over app.yml's.
    assert app_verify.local_app(app_dir=str(folder), name="other", options={"public_logs": False}).compose_hash == \
        _hash("other", allowed_envs=["A"], public_logs=False, secure_time=True)
    # A compose file alone: the name given, else its folder's.
    compose = str(folder / "docker-compose.yaml")
    assert app_verify.local_app(compose=compose).compose_hash == _hash("shop")
    assert app_verify.local_app(compose=compose, name="web", options={"allowed_envs": ["A"]}).compose_hash == \
        _hash("web", allowed_envs=["A"])


@pytest.mark.parametrize("app_yml, words", [
    ("name: [1]\n", "its name must be a string"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("name: 'x\n", "is not valid YAML"),
    ("storage_fs: btrfs\n", "storage_fs"),
])
def test_a_bad_app_folder_is_named(tmp_path, app_yml, words):
    (tmp_path / "docker-compose.yaml").write_text(COMPOSE)
    (tmp_path / "app.yml").write_text(app_yml)
    with pytest.raises(DstackError) as err:
        app_verify.local_app(app_dir=str(tmp_path))
    assert words in str(err.value)


def test_a_bad_compose_file_is_named(tmp_path):
    (tmp_path / "docker-compose.yaml").write_text("services: [\n")
    with pytest.raises(DstackError) as err:
        app_verify.local_app(compose=str(tmp_path / "docker-compose.yaml"))
    assert err.value.field == "compose" and "not valid YAML" in err.value.reason


def test_module_trust_needs_a_root_and_never_makes_a_simulator(tmp_path):
    with pytest.raises(DstackError) as err:
        attestation.ModuleTrust()
    assert err.value.field == "collateral"
    with pytest.raises(DstackError) as err:
        attestation.ModuleTrust(str(tmp_path / "sim"))
    assert err.value.field == "sim_state_dir" and not (tmp_path / "sim").exists()
    assert attestation.ModuleTrust(collateral=str(tmp_path / "c.json")).mode == "production"
