# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The VMM's decisions, apart from HTTP: CVM lifecycle over a backend, state under run_path.

Every CVM has a run directory <run_path>/<vm-id>/ (dstack-reference 2.2) with vm-manifest.json,
vm-state.json, the config share shared/ (2.3), the guest's work folder work/, logs and events.
A new CVM's directory is prepared under a temporary name and renamed into place only when
complete, so a refused or failed CreateVm leaves nothing half registered.
"""

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
import uuid

from ansible_collections.dstack.tee.agents.vmm.backends.base import EXITED, RUNNING, STOPPED, VmRecord
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient

VERSION = "0.5.11-dstack.tee"
NAME_RE = compose.NAME_RE
VM_ID_RE = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
MAX_EVENTS = 20
MAX_EVENT_BODY = 4096


class NotFound(DstackError):
    pass


def _json(path, default=None):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


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
        self._lock = threading.RLock()
        self._k256 = ""
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

    def _check_ports(self, ports, exclude_id=None):
        checked = []
        for pos, port in enumerate(ports or []):
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
            address = port.get("host_address") or "127.0.0.1"
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
                raise DstackError("ports", f"host port {port['host_port']} is already taken by VM {taken[key]!r}")
            if key in seen:
                raise DstackError("ports", f"host port {port['host_port']} is given twice")
            seen.add(key)
            if port["protocol"] == "tcp" and key not in own and not _port_free(port["host_address"], port["host_port"]):
                raise DstackError("ports", f"host port {port['host_port']} on {port['host_address']} is in use")
        return checked

    def _check_config(self, cfg, exclude_id=None):
        if not isinstance(cfg, dict):
            raise DstackError("configuration", "must be a JSON object")
        name = cfg.get("name")
        if not isinstance(name, str) or not name or not NAME_RE.match(name):
            raise DstackError("name", "is required and may hold only letters, digits, spaces and -_.@~!$^()")
        if any(vm.name == name for vm in self.records() if vm.id != exclude_id):
            raise DstackError("name", f"a VM named {name!r} exists already")
        text = cfg.get("compose_file")
        if not isinstance(text, str) or not text:
            raise DstackError("compose_file", "is required: the app-compose.json text")
        app = compose.validate(compose.parse(text.encode("utf-8"), "compose_file"))
        encrypted_env = parse_hex(cfg.get("encrypted_env") or "", "encrypted_env", allow_empty=True)
        app_id = compose.app_id_for(compose.compose_hash(text.encode("utf-8")), cfg.get("app_id") or None)
        for key, default in (("vcpu", 1), ("memory", 1024), ("disk_size", 10)):
            value = cfg.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DstackError(key, "must be a positive integer")
        return app, encrypted_env, app_id, self._check_ports(cfg.get("ports"), exclude_id)

    # ---- lifecycle ----------------------------------------------------------------------------

    def create_vm(self, cfg):
        with self._lock:
            _app, encrypted_env, app_id, ports = self._check_config(cfg)
            vm_id = str(uuid.uuid4())
            staging = os.path.join(self.run_path, ".creating-" + vm_id)
            os.makedirs(os.path.join(staging, "shared"), mode=0o700)
            try:
                manifest = {
                    "id": vm_id, "name": cfg["name"], "app_id": app_id, "vcpu": cfg.get("vcpu", 1),
                    "memory": cfg.get("memory", 1024), "disk_size": cfg.get("disk_size", 10),
                    "image": cfg.get("image", ""), "port_map": ports, "created_at_ms": int(time.time() * 1000),
                    "hugepages": False, "pin_numa": False, "gpus": [], "kms_urls": cfg.get("kms_urls") or [],
                    "gateway_urls": cfg.get("gateway_urls") or [], "no_tee": bool(cfg.get("no_tee", False)),
                    "networking": cfg.get("networking") or {"mode": "user"},
                }
                atomic_write(os.path.join(staging, "vm-manifest.json"), json.dumps(manifest, indent=2).encode())
                atomic_write(os.path.join(staging, "host-api.token"), secrets.token_hex(16).encode(), mode=0o600)
                vm = VmRecord(vm_id, staging, manifest)
                # The app id is pinned in .instance_info from the start, so that an UpdateVm with a
                # new compose keeps the app (and so its keys and data).
                self._write_share(vm, cfg["compose_file"], encrypted_env, cfg.get("user_config", ""), app_id)
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
        token = open(os.path.join(vm.run_dir, "host-api.token"), encoding="ascii").read().strip()
        vm_config = {"os_image_hash": self.os_image_hash, "cpu_count": vm.manifest.get("vcpu", 1),
                     "memory_size": vm.manifest.get("memory", 1024) * 1024 * 1024, "image": vm.manifest.get("image", ""),
                     "spec_version": 1}
        sys_config = {"kms_urls": vm.manifest.get("kms_urls") or self.kms_urls,
                      "gateway_urls": vm.manifest.get("gateway_urls") or self.gateway_urls,
                      "pccs_url": "", "docker_registry": "",
                      "host_api_url": f"{self.host_api_base}/{vm.id}/{token}" if self.host_api_base else "",
                      "vm_config": json.dumps(vm_config, sort_keys=True)}
        if self.kms_ca_cert and os.path.exists(self.kms_ca_cert):
            with open(self.kms_ca_cert, encoding="utf-8") as handle:
                sys_config["kms_ca_cert"] = handle.read()
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
            cfg = {"name": vm.name, "compose_file": req.get("compose_file") or self._share_text(vm, "app-compose.json"),
                   "ports": req["ports"] if req.get("update_ports") else vm.port_map,
                   "app_id": vm.manifest.get("app_id")}
            # Everything is checked before the running VM is touched.
            _app, encrypted_env, app_id, ports = self._check_config(cfg, exclude_id=vm.id)
            if "encrypted_env" not in req:
                encrypted_env = _read(os.path.join(vm.shared_dir, ".encrypted-env"))
            else:
                encrypted_env = parse_hex(req.get("encrypted_env") or "", "encrypted_env", allow_empty=True)
            was_running = self.backend.status(vm) == RUNNING
            if was_running:
                self.backend.stop(vm, force=True)
            self._write_share(vm, cfg["compose_file"], encrypted_env, req.get("user_config", ""), cfg["app_id"])
            vm.manifest.update(app_id=app_id, port_map=ports)
            atomic_write(os.path.join(vm.run_dir, "vm-manifest.json"), json.dumps(vm.manifest, indent=2).encode())
            self.backend.create(vm)
            self._event(vm, "updated", f"compose_hash {compose.compose_hash(cfg['compose_file'].encode())}")
            if was_running or req.get("start", False):
                self.start_vm(vm.id)
            return {"id": vm.id}

    @staticmethod
    def _share_text(vm, name):
        return (_read(os.path.join(vm.shared_dir, name)) or b"").decode("utf-8")

    # ---- host API (guest -> VMM) --------------------------------------------------------------

    def host_notify(self, vm_id, token, event, payload):
        vm = self._record(vm_id)
        expected = open(os.path.join(vm.run_dir, "host-api.token"), encoding="ascii").read().strip()
        if not secrets.compare_digest(expected, str(token)):
            raise NotFound("id", "unknown VM or token")
        payload = str(payload)[:MAX_EVENT_BODY]
        if event == "boot.progress":
            self._set_state(vm, boot_progress=payload)
        elif event == "boot.error":
            self._set_state(vm, boot_error=payload)
        elif event == "shutdown.progress":
            self._set_state(vm, shutdown_progress=payload)
        elif event == "instance.info":
            try:
                info = json.loads(payload)
            except ValueError:
                raise DstackError("payload", "instance.info must be JSON") from None
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
        return info

    def _app_url(self, vm, instance_id):
        if self.base_domain and instance_id:
            return f"https://{instance_id}-8090.{self.base_domain}"
        ports = vm.port_map
        return f"http://{ports[0]['host_address']}:{ports[0]['host_port']}" if ports else ""

    def status(self, req):
        ids = set(req.get("ids") or [])
        keyword = str(req.get("keyword") or "").lower()
        vms = [vm for vm in self.records() if (not ids or vm.id in ids)
               and (not keyword or keyword in vm.name.lower() or keyword in vm.manifest.get("app_id", ""))]
        page, size = int(req.get("page") or 0), int(req.get("page_size") or 0)
        total = len(vms)
        if page and size:
            vms = vms[(page - 1) * size: page * size]
        return {"vms": [self.info(vm, brief=bool(req.get("brief"))) for vm in vms], "port_mapping_enabled": True,
                "total": total}

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
                "resources": {"max_cvm_number": int(self.config.get("max_cvm_number", 100)),
                              "max_allocable_vcpu": int(self.config.get("max_allocable_vcpu", 20)),
                              "max_allocable_memory_in_mb": int(self.config.get("max_allocable_memory_in_mb", 100000))}}

    def get_compose_hash(self, cfg):
        text = cfg.get("compose_file")
        if not isinstance(text, str) or not text:
            raise DstackError("compose_file", "is required: the app-compose.json text")
        return {"hash": compose.compose_hash(text.encode("utf-8"))}

    def get_app_env_encrypt_pubkey(self, app_id):
        if not self.kms_urls:
            raise DstackError("kms_urls", "this VMM knows no KMS")
        return KmsClient(self.kms_urls[0], ca_cert=self.kms_ca_cert).get_app_env_encrypt_pubkey(app_id)

    def log_path(self, vm_id, channel):
        vm = self._record(vm_id)
        paths = {"stdout": vm.stdout_log, "stderr": vm.stderr_log, "serial": vm.serial_log}
        if channel not in paths:
            raise DstackError("ch", "must be stdout, stderr or serial")
        return paths[channel]

    def recover(self):
        """After a VMM (or host) restart: start the VMs that should run and are not running."""
        for vm in self.records():
            if self._state(vm).get("started") and self.backend.status(vm) != RUNNING:
                self.backend.create(vm)
                self.start_vm(vm.id)


def _read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return b""


def _last_error(path):
    """The last line of a CVM's stderr: why its process exited, when the guest could not report it."""
    lines = [line for line in _read(path)[-8192:].decode("utf-8", "replace").splitlines() if line.strip()]
    return "exited: " + lines[-1][:500] if lines else "exited"


def _sha256_or_empty(path):
    data = _read(path)
    return hashlib.sha256(data).hexdigest() if data else ""


def _port_free(address, port):
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
            return True
        except OSError:
            return False


def _uptime(started_at):
    if not started_at:
        return ""
    seconds = int(time.time() - started_at)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _iso(stamp):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if stamp else ""
