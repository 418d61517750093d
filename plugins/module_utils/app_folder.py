# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""An app folder (deploy-app.yml's `-e app_dir`): docker-compose.yaml, an optional app.yml (the app's
name, its port map, its images and its app-compose fields) and an optional secrets.env.

The one reading of a folder: dstack.tee.app_check reads it for roles/app before anything is
changed, and verify_app computes the compose_hash a deployment of it has. Every error names the
file (and, for YAML and .env text, the line) and never a secret's value.
"""

import ipaddress
import os
from dataclasses import dataclass, field as dataclass_field

from ansible_collections.dstack.tee.plugins.module_utils import app_compose, env_crypt, fileio, image_archive, placement
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

COMPOSE_FILE = "docker-compose.yaml"
APP_YML = "app.yml"
SECRETS_FILE = "secrets.env"
PROTOCOLS = ("tcp", "udp")


@dataclass
class AppFolder:
    """What a deployment of the folder runs. app_compose is checked (app_compose.build); ports are
    the VMM's port map entries {protocol, host_port, vm_port, host_address}; secrets is the path of
    secrets.env, "" when the folder has none; images are app.yml's images entries, each
    {entry, archive} (an absolute path, not read here: see image_list) or {entry, name}, entry
    naming it as errors do ("/app/app.yml: images[0]")."""
    path: str
    name: str
    app_compose: dict
    ports: list = dataclass_field(default_factory=list)
    secrets: str = ""
    images: list = dataclass_field(default_factory=list)
    # Placement (placement.py), not part of the app-compose: 0 when app.yml sets no replicas.
    replicas: int = 0
    hosts: list = dataclass_field(default_factory=list)
    # app.yml's app_id (40 hex digits, no 0x), "" when it names none (then compose_hash[0:20]).
    app_id: str = ""


def read(app_dir, name=None, options=None, host_port=0, field="app_dir"):
    """The app folder at app_dir, checked: the compose text parses and has services, app.yml parses
    and holds only app-compose fields, name and ports, and the app-compose these make is valid.

    name and options (app-compose fields) win over app.yml's; host_port (not 0) replaces the host
    port of app.yml's one port mapping. Raises DstackError naming the file, or `field` for the folder.
    """
    folder = os.path.abspath(app_dir)
    if not os.path.isdir(folder):
        reason = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise DstackError(field, f"{folder} {reason}")
    compose_path = os.path.join(folder, COMPOSE_FILE)
    if not os.path.isfile(compose_path):
        raise DstackError(field, f"{folder} has no {COMPOSE_FILE}")
    compose_text = fileio.read_text(compose_path, compose_path)
    yml_path = os.path.join(folder, APP_YML)
    yml_text = fileio.read_text(yml_path, yml_path, missing_ok=True) or ""
    spec_name, spec_options = app_compose.app_yml_options(yml_text, yml_path)
    name = name or spec_name or os.path.basename(folder)
    options = dict(spec_options, **{k: v for k, v in (options or {}).items() if v is not None})
    if options.get("runner") != "bash":
        app_compose.parse_compose_yaml(compose_text, compose_path)
    try:
        app = app_compose.build(compose_text, name, **options)
    except DstackError as exc:
        if exc.field == "name" and name != spec_name:
            if name != os.path.basename(folder):
                raise  # the name given, not the folder's

            raise DstackError(field, f"the app's name is its folder's, {name!r} ({APP_YML} names none), "
                                     f"and a name {exc.reason}") from None
        # A field of app.yml: named with its file.
        raise DstackError(f"{yml_path}: {exc.field}", exc.reason) from None
    ports = port_map(_yaml_key(yml_text, yml_path, "ports"), f"{yml_path}: ports")
    if host_port:
        ports = _replace_host_port(ports, host_port, yml_path)
    images = _images(_yaml_key(yml_text, yml_path, "images"), folder, f"{yml_path}: images")
    replicas = _yaml_key(yml_text, yml_path, "replicas")
    replicas = placement.check_replicas(replicas, f"{yml_path}: replicas") if replicas is not None else 0
    hosts = _yaml_key(yml_text, yml_path, "hosts")
    hosts = placement.check_hosts(hosts, f"{yml_path}: hosts") if hosts is not None else []
    app_id = _yaml_key(yml_text, yml_path, "app_id")
    if app_id is not None and not isinstance(app_id, str):
        # YAML reads an unquoted 0x... or all-digit value as a number, losing its leading zeros.
        raise DstackError(f"{yml_path}: app_id", "must be 40 hex digits in quotes (\"0x...\")")
    app_id = parse_hex(app_id, f"{yml_path}: app_id", length=20).hex() if app_id is not None else ""
    secrets = os.path.join(folder, SECRETS_FILE)
    return AppFolder(path=folder, name=name, app_compose=app, ports=ports,
                     secrets=secrets if os.path.isfile(secrets) else "", images=images, replicas=replicas,
                     hosts=hosts, app_id=app_id)


def secret_names(app):
    """(names kept, names dropped as not in allowed_envs) of the folder's secrets.env, parsed as
    dstack.tee.env_encrypt parses it; ([], []) without one. Only names leave this function."""
    if not app.secrets:
        return [], []
    items = env_crypt.parse_dotenv(fileio.read_text(app.secrets, app.secrets), app.secrets)
    kept, dropped = env_crypt.filter_allowed(items, app.app_compose.get("allowed_envs"))
    return [key for key, _value in kept], dropped


def _yaml_key(yml_text, yml_path, key):
    if not yml_text.strip():
        return None
    spec = app_compose.load_yaml(yml_text, yml_path)  # parsed before, by app_yml_options
    return spec.get(key) if isinstance(spec, dict) else None


def _images(images, folder, field):
    """app.yml's images checked: a list of {archive: FILE} (relative to the app folder) or
    {name: IMAGE} (an image in the controller's podman store). The archives are not read here (an
    outsider verifying the app needs none of them): image_list reads them."""
    if images is None:
        return []
    if not isinstance(images, list):
        raise DstackError(field, "must be a list of {archive: FILE} or {name: IMAGE}")
    checked = []
    for pos, item in enumerate(images):
        where = f"{field}[{pos}]"
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in ("archive", "name"):
            raise DstackError(where, "must be {archive: FILE} (an image archive, podman save --format "
                                     "docker-archive) or {name: IMAGE} (an image in the controller's podman store)")
        key, value = next(iter(item.items()))
        if key == "name":
            checked.append({"entry": where, "name": image_archive.check_name(value, f"{where}.name")})
            continue
        if not isinstance(value, str) or not value.strip():
            raise DstackError(f"{where}.archive", "must be the path of an image archive, relative to the app folder")
        checked.append({"entry": where, "archive": os.path.normpath(os.path.join(folder, value))})
    return checked


def image_list(app, store=None):
    """The app's images as roles/app ships them: [{entry, id, names, archive}], each archive read
    (image_archive.read_archive: its image ID and names) and each name looked up in `store` (an
    image_archive.PodmanStore: the controller's), its archive then "" (saved when a host lacks it).
    Raises DstackError naming the app.yml entry."""
    listed = []
    for image in app.images:
        if "archive" in image:
            found = image_archive.read_archive(image["archive"], f"{image['entry']}.archive")
            listed.append({"entry": image["entry"], "id": found.id, "names": list(found.names),
                           "archive": image["archive"]})
            continue
        found_id = (store or image_archive.PodmanStore(field=f"{image['entry']}.name")).image_id(image["name"])
        if found_id is None:
            raise DstackError(f"{image['entry']}.name", f"{image['name']} is not in the controller's podman store: "
                                                        "build or load it there, or list its archive instead")
        listed.append({"entry": image["entry"], "id": found_id, "names": [image["name"]], "archive": ""})
    return listed


def port_map(ports, field="ports"):
    """A port map (the VMM's CreateVm `ports`) checked: a list of {host_port, vm_port, protocol
    (tcp), host_address (127.0.0.1)}, each port 1 to 65535, no host port given twice. Returns it
    with the defaults filled in."""
    if ports is None:
        return []
    if not isinstance(ports, list):
        raise DstackError(field, "must be a list of {host_port, vm_port, protocol, host_address}")
    checked, seen = [], set()
    for pos, port in enumerate(ports):
        where = f"{field}[{pos}]"
        if not isinstance(port, dict):
            raise DstackError(where, "must be a mapping {host_port, vm_port, protocol, host_address}")
        unknown = sorted(str(k) for k in port if k not in ("host_port", "vm_port", "protocol", "host_address"))
        if unknown:
            raise DstackError(f"{where}.{unknown[0]}", "is not a port map field (host_port, vm_port, protocol, host_address)")
        entry = {"protocol": port.get("protocol") or "tcp", "host_address": str(port.get("host_address") or "127.0.0.1")}
        if entry["protocol"] not in PROTOCOLS:
            raise DstackError(f"{where}.protocol", "must be tcp or udp")
        for key in ("host_port", "vm_port"):
            value = port.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise DstackError(f"{where}.{key}", f"must be a port number 1 to 65535 (got {str(value)[:40]!r})")
            entry[key] = value
        try:
            ipaddress.ip_address(entry["host_address"])
        except ValueError:
            raise DstackError(f"{where}.host_address", f"{entry['host_address'][:60]!r} is not an IP address") from None
        key = (entry["protocol"], entry["host_port"])
        if key in seen:
            raise DstackError(where, f"host port {entry['host_port']}/{entry['protocol']} is mapped twice")
        seen.add(key)
        checked.append(entry)
    return checked


def _replace_host_port(ports, host_port, yml_path):
    if isinstance(host_port, bool) or not isinstance(host_port, int) or not 1 <= host_port <= 65535 or len(ports) != 1:
        raise DstackError("host_port", f"replaces the host port of {yml_path}'s one port mapping: it must be 1 "
                                       f"to 65535 (got {str(host_port)[:40]}), and {yml_path} must map exactly one "
                                       f"port (it maps {len(ports)})")
    return [dict(ports[0], host_port=host_port)]
