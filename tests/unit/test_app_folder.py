"""module_utils.app_folder: an app folder read as deploy-app.yml reads it; every error names its file."""

import os

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import app_compose, app_folder
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

COMPOSE = "services:\n  web:\n    image: nginx\n"
APP_YML = "name: shop\nallowed_envs: [A, B]\nports:\n  - {host_port: 8080, vm_port: 80}\n"


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "shop-folder"
    path.mkdir()
    (path / "docker-compose.yaml").write_text(COMPOSE)
    (path / "app.yml").write_text(APP_YML)
    return path


def _error(folder, **kwargs):
    with pytest.raises(DstackError) as err:
        app = app_folder.read(str(folder), **kwargs)
        app_folder.secret_names(app)
    return str(err.value)


def test_the_folder_gives_the_app_its_ports_and_its_secret_names(folder):
    (folder / "secrets.env").write_text("A=1\nexport B='two words'\nC=\"dropped\"\n")
    app = app_folder.read(str(folder))
    assert app.name == "shop" and app.path == str(folder) and app.secrets == str(folder / "secrets.env")
    # The app-compose the role authorizes: app.yml's fields, dstack's defaults for the rest.
    expected = app_compose.build(COMPOSE, "shop", allowed_envs=["A", "B"])
    assert app_compose.render(app.app_compose) == app_compose.render(expected)
    assert app.ports == [{"protocol": "tcp", "host_address": "127.0.0.1", "host_port": 8080, "vm_port": 80}]
    assert app_folder.secret_names(app) == (["A", "B"], ["C"])
    # host_port replaces the one mapping's host port.
    assert app_folder.read(str(folder), host_port=18080).ports[0]["host_port"] == 18080


def test_replicas_hosts_and_app_id_leave_the_compose_hash_as_it_is(folder):
    before = app_folder.read(str(folder))
    assert before.replicas == 0 and before.hosts == []
    (folder / "app.yml").write_text(APP_YML + "replicas: 2\nhosts: [host2, host3]\n")
    after = app_folder.read(str(folder))
    assert after.replicas == 2 and after.hosts == ["host2", "host3"] and after.app_id == ""
    (folder / "app.yml").write_text(APP_YML + f"app_id: '0x{'0A' * 20}'\n")
    assert app_folder.read(str(folder)).app_id == "0a" * 20
    assert app_compose.render(after.app_compose) == app_compose.render(before.app_compose)


def test_without_app_yml_or_secrets_the_folder_names_the_app(folder):
    os.remove(folder / "app.yml")
    app = app_folder.read(str(folder) + "/")
    assert app.name == "shop-folder" and app.ports == [] and app.secrets == ""
    assert app_folder.secret_names(app) == ([], [])


@pytest.mark.parametrize("name, text, words", [
    ("docker-compose.yaml", "services:\n  web:\n   image: [x\n", "docker-compose.yaml: is not valid YAML at line 4"),
    ("docker-compose.yaml", "service:\n  web: {image: x}\n", "docker-compose.yaml: has no `services` mapping"),
    ("app.yml", "name: shop\nallowed_envs: [A\n", "app.yml: is not valid YAML at line 3"),
    ("app.yml", "name: shop\ncolour: blue\n", "colour: in {folder}/app.yml is not an app-compose field"),
    ("app.yml", "name: bad/name\n", "app.yml: name: may hold only"),
    ("app.yml", "ports: [{host_port: 0, vm_port: 80}]\n", "app.yml: ports[0].host_port: must be a port number"),
    ("app.yml", "ports: [{host_port: 80, vm_port: 80, protocol: sctp}]\n", "app.yml: ports[0].protocol: must be tcp or udp"),
    ("app.yml", "ports: [{host_port: 80, vm_port: 80}, {host_port: 80, vm_port: 81}]\n", "host port 80/tcp is mapped twice"),
    ("app.yml", "ports: [{host_port: 80, vm_port: 80, host: x}]\n", "app.yml: ports[0].host: is not a port map field"),
    ("app.yml", "replicas: 0\n", "app.yml: replicas: must be a whole number from 1"),
    ("app.yml", "replicas: two\n", "app.yml: replicas: must be a whole number from 1"),
    ("app.yml", "hosts: host2\n", "app.yml: hosts: must be a non-empty list of inventory host names"),
    ("app.yml", "app_id: 0x12\n", "app.yml: app_id: must be 40 hex digits in quotes"),
    ("app.yml", "app_id: 'xyz'\n", "app.yml: app_id: is not hex"),
    ("secrets.env", "A=1\nthis line is no variable\n", "secrets.env line 2: is not KEY=value"),
    ("secrets.env", "A=\"never closed\n", "secrets.env line 1: the value of A has no closing \""),
])
def test_a_mistake_names_its_file_and_line(folder, name, text, words):
    (folder / name).write_text(text)
    message = _error(folder)
    assert str(folder) in message and words.format(folder=folder) in message, message
    assert "never closed" not in message  # no secret value in an error


def test_a_missing_folder_or_compose_file_names_the_absolute_path(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _error("nowhere") == f"app_dir: {tmp_path / 'nowhere'} does not exist"
    os.remove(folder / "docker-compose.yaml")
    assert _error(folder.name) == f"app_dir: {folder} has no docker-compose.yaml"


def test_host_port_needs_exactly_one_mapping(folder):
    (folder / "app.yml").write_text("ports: [{host_port: 80, vm_port: 80}, {host_port: 81, vm_port: 81}]\n")
    assert "must map exactly one port (it maps 2)" in _error(folder, host_port=18080)


def test_a_folder_name_that_is_no_app_name_is_named(tmp_path):
    folder = tmp_path / "a,b"
    folder.mkdir()
    (folder / "docker-compose.yaml").write_text(COMPOSE)
    assert "the app's name is its folder's, 'a,b' (app.yml names none)" in _error(folder)
