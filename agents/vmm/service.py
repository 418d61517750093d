# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The VMM's decisions, apart from HTTP: CVM lifecycle over a backend, state under run_path.

Every CVM has a run directory <run_path>/<vm-id>/ (dstack-reference 2.2) with vm-manifest.json,
vm-state.json, the config share shared/ (2.3), the guest's work folder work/, logs and events.
A new CVM's directory is prepared under a temporary name and renamed into place only when
complete, so a refused or failed CreateVm leaves nothing half registered.
"""

import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

from ansible_collections.dstack.tee.agents.vmm.backends.base import EXITED, RUNNING, STOPPED, VmRecord
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils import service_log
from ansible_collections.dstack.tee.plugins.module_utils import host_ports
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes, read_json, read_text
from ansible_collections.dstack.tee.plugins.module_utils.json_limits import check_depth, loads as json_loads
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient

VERSION = "0.5.11-dstack.tee"
NAME_RE = compose.NAME_RE
VM_ID_RE = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
MAX_EVENTS = 20
MAX_EVENT_BODY = 4096
MAX_URLS = 16
MAX_URL_LENGTH = 2048
MAX_IMAGE_NAME = 256
MAX_LOG_LINES = 10000
# The limits a VMM enforces and advertises in GetMeta resources: vmm.toml key -> default.
LIMIT_DEFAULTS = {"max_cvm_number": 100, "max_allocable_vcpu": 20, "max_allocable_memory_in_mb": 100000,
                  "max_disk_size_gb": 1000, "max_name_length": 64}


class NotFound(DstackError):
    pass


def listen_host(config):
    """The host part of the VMM's `listen` HOST:PORT, without IPv6 brackets."""
    return str(config.get("listen") or "127.0.0.1:9080").rpartition(":")[0].strip("[]")


def read_limits(config):
    """The VMM's limits from its config, checked: positive integers, and the host addresses a CVM
    port may be published on (default: the VMM's own listen address; loopback is always allowed)."""
    limits = {}
    for key, default in LIMIT_DEFAULTS.items():
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DstackError(key, f"must be a positive integer, not {str(value)[:40]!r}")
        limits[key] = value
    given = config.get("allowed_host_addresses")
    if given is None:
        host = listen_host(config)
        given = ["127.0.0.1", "::1"] if host == "localhost" else [host]
    if isinstance(given, str) or not isinstance(given, list):
        raise DstackError("allowed_host_addresses", "must be a list of IP addresses")
    addresses = []
    for pos, address in enumerate(given):
        try:
            addresses.append(ipaddress.ip_address(str(address).strip("[]")))
        except ValueError:
            raise DstackError(f"allowed_host_addresses[{pos}]", f"{str(address)[:60]!r} is not an IP address") from None
    limits["allowed_host_addresses"] = addresses
    return limits


def _int_field(value, field, low, high, default=None):
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise DstackError(field, f"must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise DstackError(field, f"must be {low} to {high} (this VMM's limit), not {value}")
    return value


def _str_field(value, field, max_length, default=""):
    if value is None:
        return default
    if not isinstance(value, str):
        raise DstackError(field, f"must be a string, not {type(value).__name__}")
    if len(value) > max_length:
        raise DstackError(field, f"is {len(value)} characters long; at most {max_length}")
    return value


def _bool_field(value, field, default=False):
    if value is None:
        return default
    if not isinstance(value, bool):
        raise DstackError(field, f"must be true or false, not {type(value).__name__}")
    return value


def _url_list(value, field):
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_URLS:
        raise DstackError(field, f"must be a list of at most {MAX_URLS} URLs")
    for pos, url in enumerate(value):
        _str_field(url, f"{field}[{pos}]", MAX_URL_LENGTH)
        if not url.startswith(("http://", "https://")):
            raise DstackError(f"{field}[{pos}]", "must be an http:// or https:// URL")
    return list(value)


def is_loopback_host(host):
    """Whether a host name or IP (IPv6 with or without brackets) is this host's loopback."""
    host = str(host or "").strip("[]").lower()
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "localhost.")


def guest_url(url, host_address):
    """`url` as a VM reaches it: a loopback host (127.0.0.0/8, ::1, localhost) becomes
    `host_address`, the host's address on the VM's network (its backend's guest_host_address);
    port, path and the rest stay. Other URLs, and every URL when host_address is None, unchanged."""
    if not host_address or not url:
        return url
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:   # a malformed port: nothing a VM could reach either way
        return url
    if host is None or not is_loopback_host(host):
        return url
    netloc = f"[{host_address}]" if ":" in host_address else host_address
    if port is not None:
        netloc += f":{port}"
    userinfo, at_sign, _hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=userinfo + at_sign + netloc))


def _json(path, default=None):
    """One of the VMM's own JSON files (manifest, state, events); `default` when missing or damaged."""
    try:
        value = read_json(path, os.path.basename(path), missing_ok=True)
    except DstackError:
        return default
    return default if value is None else value


class VmmService:
    def __init__(self, config, backend):
        self.config = config
        self.backend = backend
        self.run_path = os.path.abspath(config["run_path"])
        os.makedirs(self.run_path, mode=0o700, exist_ok=True)
        self.kms_urls = list(config.get("kms_urls") or [])
        self.kms_ca_cert = config.get("kms_ca_cert")
        self.gateway_urls = list(config.get("gateway_urls") or [])
        self.base_domain = config.get("base_domain", "")
        self.host_api_base = config.get("host_api_base", "")  # e.g. http://127.0.0.1:9080/host-api
        self.os_image_hash = config.get("os_image_hash", "")
        self.limits = read_limits(config)
        self._lock = threading.RLock()
        self._k256 = ""
        self._service_names = {}  # compose_hash -> its services (info)
        self._cleanup_partial()

    # ---- records ----------------------------------------------------------------------------

    def _cleanup_partial(self):
        """Remove what an interrupted CreateVm or RemoveVm left (never a complete VM)."""
        for name in os.listdir(self.run_path):
            path = os.path.join(self.run_path, name)
            if name.startswith(".creating-") or os.path.exists(os.path.join(path, ".removing")):
                shutil.rmtree(path, ignore_errors=True)

    def _record(self, vm_id):
        if not isinstance(vm_id, str) or not VM_ID_RE.match(vm_id):
            raise NotFound("id", f"{str(vm_id)[:40]!r} is not a VM id")
        run_dir = os.path.join(self.run_path, vm_id)
        manifest = _json(os.path.join(run_dir, "vm-manifest.json"))
        if manifest is None:
            raise NotFound("id", f"no VM {vm_id}")
        return VmRecord(vm_id, run_dir, manifest)

    def records(self):
        out = []
        for name in sorted(os.listdir(self.run_path)):
            if VM_ID_RE.match(name) and os.path.exists(os.path.join(self.run_path, name, "vm-manifest.json")):
                if not os.path.exists(os.path.join(self.run_path, name, ".removing")):
                    out.append(self._record(name))
        return sorted(out, key=lambda vm: vm.manifest.get("created_at_ms", 0))

    def _state(self, vm):
        return _json(os.path.join(vm.run_dir, "vm-state.json"), {"started": False})

    def _set_state(self, vm, **changes):
        state = dict(self._state(vm), **changes)
        atomic_write(os.path.join(vm.run_dir, "vm-state.json"), json.dumps(state).encode(), mode=0o644)

    # ---- validation ---------------------------------------------------------------------------

    def _check_address(self, value, field):
        """A host address a CVM port may be published on: an IP this VMM allows (see read_limits)."""
        if value is None or value == "":
            return "127.0.0.1"
        if not isinstance(value, str):
            raise DstackError(field, f"must be an IP address string, not {type(value).__name__}")
        try:
            address = ipaddress.ip_address(value.strip("[]"))
        except ValueError:
            raise DstackError(field, f"{value[:60]!r} is not an IP address") from None
        allowed = self.limits["allowed_host_addresses"]
        # Loopback exposes no more than the VMM itself; an allowed wildcard (0.0.0.0, ::) allows
        # every single address of its family, each exposing less.
        wildcards = {a.version for a in allowed if a.is_unspecified}
        if not address.is_loopback and address not in allowed and address.version not in wildcards:
            shown = ", ".join(str(a) for a in allowed)
            raise DstackError(field, f"{address} is not an allowed host address (this VMM allows {shown} and "
                                     "loopback; see allowed_host_addresses)")
        return str(address)

    def _check_ports(self, ports, exclude_id=None):
        if ports is None:
            ports = []
        if not isinstance(ports, list):
            raise DstackError("ports", "must be a list of {protocol, host_port, vm_port, host_address}")
        if len(ports) > 256:
            raise DstackError("ports", "at most 256 port mappings")
        checked = []
        for pos, port in enumerate(ports):
            field = f"ports[{pos}]"
            if not isinstance(port, dict):
                raise DstackError(field, "must be {protocol, host_port, vm_port, host_address}")
            protocol = port.get("protocol", "tcp")
            if protocol not in ("tcp", "udp"):
                raise DstackError(f"{field}.protocol", "must be tcp or udp")
            values = {}
            for key in ("host_port", "vm_port"):
                value = port.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                    raise DstackError(f"{field}.{key}", "must be a port number 1 to 65535")
                values[key] = value
            address = self._check_address(port.get("host_address"), f"{field}.host_address")
            checked.append({"protocol": protocol, "host_address": address, **values})
        taken, own = {}, set()
        for vm in self.records():
            for port in vm.port_map:
                if vm.id == exclude_id:
                    own.add((port["protocol"], port["host_port"]))  # held by the VM being updated
                else:
                    taken[(port["protocol"], port["host_port"])] = vm.name
        seen = set()
        for port in checked:
            key = (port["protocol"], port["host_port"])
            if key in taken:
                raise DstackError("ports", f"host port {port['host_port']}/{port['protocol']} is already taken by VM "
                                           f"{taken[key]!r}")
            if key in seen:
                raise DstackError("ports", f"host port {port['host_port']}/{port['protocol']} is given twice")
            seen.add(key)
            # Not naming the holder (host_ports.refuse_if_held does, for the operator's own checks):
            # an API caller is not told other processes' command lines.
            if key not in own and not host_ports.port_free(port["protocol"], port["host_address"], port["host_port"]):
                raise DstackError("ports", f"host port {port['host_port']}/{port['protocol']} on "
                                           f"{port['host_address']} is in use")
        return checked

    def _check_config(self, cfg, exclude_id=None):
        """Every CreateVm field, checked for type and range before anything is made.

        Returns (encrypted_env bytes, app_id, ports, the manifest's fields)."""
        if not isinstance(cfg, dict):
            raise DstackError("configuration", "must be a JSON object")
        limits = self.limits
        name = _str_field(cfg.get("name"), "name", limits["max_name_length"])
        if not name or not NAME_RE.match(name):
            raise DstackError("name", "is required and may hold only letters, digits, spaces and -_.@~!$^()")
        if any(vm.name == name for vm in self.records() if vm.id != exclude_id):
            raise DstackError("name", f"a VM named {name!r} exists already")
        text = _str_field(cfg.get("compose_file"), "compose_file", 1 << 30)
        if not text:
            raise DstackError("compose_file", "is required: the app-compose.json text")
        check_depth(text, "compose_file")  # before compose.parse, whose json.loads recurses
        compose.validate(compose.parse(text.encode("utf-8"), "compose_file"))
        encrypted_env = parse_hex(cfg.get("encrypted_env") or "", "encrypted_env", allow_empty=True)
        app_id = compose.app_id_for(compose.compose_hash(text.encode("utf-8")), cfg.get("app_id") or None)
        networking = cfg.get("networking")
        if networking is not None and not isinstance(networking, dict):
            raise DstackError("networking", "must be a JSON object")
        fields = {
            "vcpu": _int_field(cfg.get("vcpu"), "vcpu", 1, limits["max_allocable_vcpu"], default=1),
            "memory": _int_field(cfg.get("memory"), "memory", 1, limits["max_allocable_memory_in_mb"], default=1024),
            "disk_size": _int_field(cfg.get("disk_size"), "disk_size", 1, limits["max_disk_size_gb"], default=10),
            "image": _str_field(cfg.get("image"), "image", MAX_IMAGE_NAME),
            "kms_urls": _url_list(cfg.get("kms_urls"), "kms_urls"),
            "gateway_urls": _url_list(cfg.get("gateway_urls"), "gateway_urls"),
            "no_tee": _bool_field(cfg.get("no_tee"), "no_tee"),
            "networking": networking or {"mode": "user"},
        }
        _str_field(cfg.get("user_config"), "user_config", 1 << 20)
        _bool_field(cfg.get("stopped"), "stopped")
        return encrypted_env, app_id, self._check_ports(cfg.get("ports"), exclude_id), fields

    # ---- lifecycle ----------------------------------------------------------------------------

    def create_vm(self, cfg):
        with self._lock:
            encrypted_env, app_id, ports, fields = self._check_config(cfg)
            if len(self.records()) >= self.limits["max_cvm_number"]:
                raise DstackError("max_cvm_number", f"this VMM holds {self.limits['max_cvm_number']} CVMs already")
            vm_id = str(uuid.uuid4())
            staging = os.path.join(self.run_path, ".creating-" + vm_id)
            os.makedirs(os.path.join(staging, "shared"), mode=0o700)
            try:
                manifest = {
                    "id": vm_id, "name": cfg["name"], "app_id": app_id, **fields, "port_map": ports,
                    "created_at_ms": int(time.time() * 1000), "hugepages": False, "pin_numa": False, "gpus": [],
                }
                atomic_write(os.path.join(staging, "vm-manifest.json"), json.dumps(manifest, indent=2).encode())
                atomic_write(os.path.join(staging, "host-api.token"), secrets.token_hex(16).encode(), mode=0o600)
                vm = VmRecord(vm_id, staging, manifest)
                # The app id is pinned in .instance_info from the start, so that an UpdateVm with a
                # new compose keeps the app (and so its keys and data).
                self._write_share(vm, cfg["compose_file"], encrypted_env, cfg.get("user_config") or "", app_id)
                os.rename(staging, os.path.join(self.run_path, vm_id))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            vm = self._record(vm_id)
            self._set_state(vm, started=False)
            self._event(vm, "created", f"app_id {app_id}")
            try:
                self.backend.create(vm)
            except BaseException:
                self._remove_files(vm)
                raise
            if not cfg.get("stopped"):
                self.start_vm(vm_id)
            return {"id": vm_id}

    def _write_share(self, vm, compose_text, encrypted_env, user_config, app_id):
        share = vm.shared_dir
        atomic_write(os.path.join(share, "app-compose.json"), compose_text.encode("utf-8"))
        env_path = os.path.join(share, ".encrypted-env")
        if encrypted_env:
            atomic_write(env_path, encrypted_env)
        elif os.path.exists(env_path):
            os.unlink(env_path)
        if user_config:
            atomic_write(os.path.join(share, ".user-config"), user_config.encode("utf-8"))
        if app_id:
            atomic_write(os.path.join(share, ".instance_info"), json.dumps({"app_id": app_id}).encode())

    def _sys_config(self, vm):
        token = _host_api_token(vm)
        vm_config = {"os_image_hash": self.backend.os_image_hash(vm) or self.os_image_hash, "cpu_count": vm.manifest.get("vcpu", 1),
                     "memory_size": vm.manifest.get("memory", 1024) * 1024 * 1024, "image": vm.manifest.get("image", ""),
                     "spec_version": 1}
        # The VM's view of the host: loopback URLs name the host's address on the VM's network.
        guest = self.backend.guest_host_address
        sys_config = {"kms_urls": [guest_url(url, guest) for url in vm.manifest.get("kms_urls") or self.kms_urls],
                      "gateway_urls": [guest_url(url, guest)
                                       for url in vm.manifest.get("gateway_urls") or self.gateway_urls],
                      "pccs_url": "", "docker_registry": "",
                      "host_api_url": f"{guest_url(self.host_api_base, guest)}/{vm.id}/{token}"
                                      if self.host_api_base else "",
                      "vm_config": json.dumps(vm_config, sort_keys=True)}
        if self.kms_ca_cert and os.path.exists(self.kms_ca_cert):
            sys_config["kms_ca_cert"] = read_text(self.kms_ca_cert, "kms_ca_cert")
        atomic_write(os.path.join(vm.shared_dir, ".sys-config.json"), json.dumps(sys_config, indent=2).encode())

    def start_vm(self, vm_id):
        with self._lock:
            vm = self._record(vm_id)
            self._sys_config(vm)
            self._set_state(vm, started=True, boot_progress="starting", boot_error="", started_at=time.time())
            self.backend.start(vm)
            self._event(vm, "started", "")
            return {}

    def stop_vm(self, vm_id, force=True):
        with self._lock:
            vm = self._record(vm_id)
            self.backend.stop(vm, force=force)
            self._set_state(vm, started=False, exited_at=time.time(), boot_progress="",
                            shutdown_progress="stopped" if force else "shutting down")
            self._event(vm, "stopped" if force else "shutdown", "")
            return {}

    def remove_vm(self, vm_id):
        with self._lock:
            vm = self._record(vm_id)
            atomic_write(os.path.join(vm.run_dir, ".removing"), b"")
            self.backend.remove(vm)
            self._remove_files(vm)
            return {}

    def _remove_files(self, vm):
        shutil.rmtree(vm.run_dir, ignore_errors=True)

    def update_vm(self, req):
        """New compose, env or ports for a VM: stop, rewrite the share, start. The work folder stays."""
        with self._lock:
            vm = self._record(req.get("id"))
            update_ports = _bool_field(req.get("update_ports"), "update_ports")
            start = _bool_field(req.get("start"), "start")
            user_config = _str_field(req.get("user_config"), "user_config", 1 << 20)
            cfg = {"name": vm.name, "compose_file": req.get("compose_file") or self._share_text(vm, "app-compose.json"),
                   "ports": req.get("ports") if update_ports else vm.port_map,
                   "app_id": vm.manifest.get("app_id")}
            # Everything is checked before the running VM is touched.
            encrypted_env, app_id, ports, _fields = self._check_config(cfg, exclude_id=vm.id)
            if "encrypted_env" not in req:
                encrypted_env = _read(os.path.join(vm.shared_dir, ".encrypted-env"))
            else:
                encrypted_env = parse_hex(req.get("encrypted_env") or "", "encrypted_env", allow_empty=True)
            for name, text in (("compose_file", cfg["compose_file"]), ("user_config", user_config or "")):
                try:  # what _write_share will encode, encoded before the VM is stopped
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise DstackError(name, "is not valid Unicode") from None
            was_running = self.backend.status(vm) == RUNNING
            if was_running:
                self.backend.stop(vm, force=True)
            self._write_share(vm, cfg["compose_file"], encrypted_env, user_config, cfg["app_id"])
            vm.manifest.update(app_id=app_id, port_map=ports)
            atomic_write(os.path.join(vm.run_dir, "vm-manifest.json"), json.dumps(vm.manifest, indent=2).encode())
            self.backend.create(vm)
            self._event(vm, "updated", f"compose_hash {compose.compose_hash(cfg['compose_file'].encode())}")
            if was_running or start:
                self.start_vm(vm.id)
            return {"id": vm.id}

    @staticmethod
    def _share_text(vm, name):
        return (_read(os.path.join(vm.shared_dir, name)) or b"").decode("utf-8")

    # ---- host API (guest -> VMM) --------------------------------------------------------------

    def host_notify(self, vm_id, token, event, payload):
        vm = self._record(vm_id)
        expected = _host_api_token(vm)
        if not secrets.compare_digest(expected.encode(), str(token).encode()):
            raise NotFound("id", "unknown VM or token")
        if not isinstance(event, str):
            raise DstackError("event", "must be a string")
        payload = _str_field(payload, "payload", 1 << 20)[:MAX_EVENT_BODY]
        if event == "boot.progress":
            self._set_state(vm, boot_progress=payload)
        elif event == "boot.error":
            self._set_state(vm, boot_error=payload)
        elif event == "shutdown.progress":
            self._set_state(vm, shutdown_progress=payload)
        elif event == "instance.info":
            info = json_loads(payload, "payload")
            if not isinstance(info, dict):
                raise DstackError("payload", "instance.info must be a JSON object")
            self._set_state(vm, instance_id=str(info.get("instance_id", "")), app_id=str(info.get("app_id", "")))
        else:
            raise DstackError("event", f"unknown host event {str(event)[:40]!r}")
        self._event(vm, event, payload)
        return {}

    def _event(self, vm, event, body):
        path = os.path.join(vm.run_dir, "events.json")
        events = _json(path, [])[-(MAX_EVENTS - 1):]
        events.append({"event": event, "body": body[:MAX_EVENT_BODY], "timestamp_ms": int(time.time() * 1000)})
        atomic_write(path, json.dumps(events).encode())

    # ---- queries ------------------------------------------------------------------------------

    def info(self, vm, brief=False):
        state = self._state(vm)
        status = self.backend.status(vm)
        compose_text = self._share_text(vm, "app-compose.json")
        instance_id = state.get("instance_id", "")
        info = {
            "id": vm.id, "name": vm.name, "status": status,
            "uptime": _uptime(state.get("started_at")) if status == RUNNING else "",
            "app_url": self._app_url(vm, instance_id), "app_id": vm.manifest.get("app_id", ""),
            "instance_id": instance_id, "exited_at": _iso(state.get("exited_at")) if status in (EXITED, STOPPED) else "",
            "boot_progress": state.get("boot_progress", ""),
            "boot_error": state.get("boot_error", "") or (_last_error(vm.stderr_log) if status == EXITED else ""),
            "shutdown_progress": state.get("shutdown_progress", ""), "image_version": "",
            "compose_hash": hashlib.sha256(compose_text.encode()).hexdigest() if compose_text else "",
            # Not in dstack's VmInfo: lets a client see whether the env it holds is the one deployed.
            "encrypted_env_sha256": _sha256_or_empty(os.path.join(vm.shared_dir, ".encrypted-env")),
        }
        if not brief:
            info["configuration"] = {
                "name": vm.name, "image": vm.manifest.get("image", ""), "compose_file": compose_text,
                "vcpu": vm.manifest.get("vcpu"), "memory": vm.manifest.get("memory"),
                "disk_size": vm.manifest.get("disk_size"), "ports": vm.port_map,
                "app_id": vm.manifest.get("app_id", ""), "kms_urls": vm.manifest.get("kms_urls", []),
                "gateway_urls": vm.manifest.get("gateway_urls", []), "no_tee": vm.manifest.get("no_tee", False)}
            info["events"] = _json(os.path.join(vm.run_dir, "events.json"), [])
            # Not in dstack's VmInfo: the compose's services, whose lines /logs can pick (`service`).
            info["services"] = self._services(info["compose_hash"], compose_text)
        return info

    def _services(self, compose_hash, compose_text):
        """The service names of an app-compose.json's docker_compose_file ([] when it has none)."""
        if compose_hash not in self._service_names:
            try:
                doc = compose.parse(compose_text.encode("utf-8"), "compose_file")
                names = sorted(compose.parse_compose_yaml(doc.get("docker_compose_file"), "docker_compose_file")["services"])
            except (DstackError, AttributeError):
                names = []
            if len(self._service_names) > 1000:
                self._service_names.clear()
            self._service_names[compose_hash] = [str(name) for name in names]
        return self._service_names[compose_hash]

    def _app_url(self, vm, instance_id):
        if self.base_domain and instance_id:
            return f"https://{instance_id}-8090.{self.base_domain}"
        ports = vm.port_map
        return f"http://{ports[0]['host_address']}:{ports[0]['host_port']}" if ports else ""

    def status(self, req):
        ids = req.get("ids")
        if ids is None:
            ids = []
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DstackError("ids", "must be a list of VM ids")
        ids = set(ids)
        keyword = _str_field(req.get("keyword"), "keyword", 1024).lower()
        page = _int_field(req.get("page"), "page", 0, 1 << 31, default=0)
        size = _int_field(req.get("page_size"), "page_size", 0, 1 << 31, default=0)
        brief = _bool_field(req.get("brief"), "brief")
        vms = [vm for vm in self.records() if (not ids or vm.id in ids)
               and (not keyword or keyword in vm.name.lower() or keyword in vm.manifest.get("app_id", ""))]
        total = len(vms)
        if page and size:
            vms = vms[(page - 1) * size: page * size]
        return {"vms": [self.info(vm, brief=brief) for vm in vms], "port_mapping_enabled": True, "total": total}

    def get_info(self, vm_id):
        try:
            return {"found": True, "info": self.info(self._record(vm_id))}
        except NotFound:
            return {"found": False}

    def _kms_k256_pubkey(self):
        """The KMS's k256 public key (cached), for deployers that check env-key signatures."""
        if not self._k256 and self.kms_urls:
            try:
                self._k256 = KmsClient(self.kms_urls[0], ca_cert=self.kms_ca_cert, timeout=5).get_meta().get(
                    "k256_pubkey", "")
            except DstackError:
                return ""
        return self._k256

    def get_meta(self):
        # kms.k256_pubkey is not in dstack's GetMeta: the web UI shows it, for the operator to
        # compare with the key they pinned, before the page encrypts an env to a KMS-signed key.
        return {"kms": {"url": self.kms_urls[0] if self.kms_urls else "", "urls": self.kms_urls,
                        "k256_pubkey": self._kms_k256_pubkey()},
                "gateway": {"url": self.gateway_urls[0] if self.gateway_urls else "", "base_domain": self.base_domain,
                            "port": 443, "agent_port": 8090, "urls": self.gateway_urls},
                # The limits CreateVm enforces (read_limits); the last two are not in dstack's GetMeta.
                "resources": {**{key: self.limits[key] for key in LIMIT_DEFAULTS},
                              "allowed_host_addresses": [str(a) for a in self.limits["allowed_host_addresses"]]}}

    def list_images(self):
        """dstack's ListImages (name, version, is_dev), with each image's os_image_hash (not in
        dstack's answer): what deploy-app.yml checks the deployer's pinned hash against (the host
        is not trusted to name the hash the KMS allows)."""
        return {"images": self.backend.images()}

    def get_compose_hash(self, cfg):
        text = cfg.get("compose_file")
        if not isinstance(text, str) or not text:
            raise DstackError("compose_file", "is required: the app-compose.json text")
        return {"hash": compose.compose_hash(text.encode("utf-8"))}

    def get_app_env_encrypt_pubkey(self, app_id):
        parse_hex(app_id, "app_id", length=20)
        if not self.kms_urls:
            raise DstackError("kms_urls", "this VMM knows no KMS")
        return KmsClient(self.kms_urls[0], ca_cert=self.kms_ca_cert).get_app_env_encrypt_pubkey(app_id)

    def log_request(self, params):
        """A /logs request checked: (log file path, lines, follow, service or None); see app.py."""
        lines = _int_field(params.get("lines"), "lines", 1, MAX_LOG_LINES, default=200)
        follow = _bool_field(params.get("follow"), "follow")
        channel = params.get("ch", "stdout")
        if channel not in ("stdout", "stderr", "serial"):
            raise DstackError("ch", "must be stdout, stderr or serial")
        service = service_log.check_service(params.get("service"))
        vm = self._record(params.get("id"))
        path = {"stdout": vm.stdout_log, "stderr": vm.stderr_log, "serial": vm.serial_log}[channel]
        return path, lines, follow, service

    def recover(self):
        """After a VMM (or host) restart: start the VMs that should run and are not running."""
        for vm in self.records():
            if self._state(vm).get("started") and self.backend.status(vm) != RUNNING:
                self.backend.create(vm)
                self.start_vm(vm.id)


def _host_api_token(vm):
    """The CVM's host API token (written when it was created)."""
    return read_text(os.path.join(vm.run_dir, "host-api.token"), "host-api.token", encoding="ascii").strip()


def _read(path):
    return read_bytes(path, os.path.basename(path), missing_ok=True) or b""


def _last_error(path):
    """The last line of a CVM's stderr: why its process exited, when the guest could not report it."""
    lines = [line for line in _read(path)[-8192:].decode("utf-8", "replace").splitlines() if line.strip()]
    return "exited: " + lines[-1][:500] if lines else "exited"


def _sha256_or_empty(path):
    data = _read(path)
    return hashlib.sha256(data).hexdigest() if data else ""


def _uptime(started_at):
    if not started_at:
        return ""
    seconds = int(time.time() - started_at)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _iso(stamp):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if stamp else ""
