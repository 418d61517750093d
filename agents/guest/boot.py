# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The CVM boot: what dstack-util setup does (dstack-reference 2.3, 6, 7.3), one named step at a time.

    read-config     app-compose.json (required), .sys-config.json, .encrypted-env, .instance_info
    instance-id     app_id and instance_id (the seed kept in the work folder and told to the host)
    measure         RTMR3: system-preparing, app-id, compose-hash, instance-id, os-image-hash,
                    key-provider (for kms: the KMS's root, checked against a pinned
                    key_provider_id first), boot-mr-done
    keys            key_provider kms: attested key release from the KMS (its root must be the
                    measured one); none: a fresh seed; local: refused here (no SGX local key
                    provider in this environment)
    measure-system  RTMR3: storage-fs, system-ready
    env             decrypt .encrypted-env, drop names not in allowed_envs (logged by name),
                    write .decrypted-env and .decrypted-env.json (0600)
    gateway         only when app-compose's gateway_enabled and .sys-config.json's gateway_urls:
                    RegisterCvm with the first gateway that answers (RA-TLS both ways: this
                    CVM's GetTlsKey certificate from the KMS; the gateway's must be the KMS's
                    gateway_app_id, attested), the WireGuard interface up in the CVM's network
                    namespace (required: `netns`, or `own_network` in a VM), and a checker that
                    registers again when the tunnel goes stale (agents/guest/gateway_link.py)
    containers      load the app's images the host put in the config share (images/*.tar,
                    docker-archive; a loaded image is as trusted as one pulled through the host's
                    network: the measured compose names it), then start the compose services
                    (docker compose or podman-compose), once the socket API they mount listens
                    (`before_containers`); started beside the gateway step, which they do not
                    need, and reported after it

Progress and errors go to boot.json in the work folder and, when .sys-config.json names a
host_api_url (http://...), to the host as HostApi.Notify events: POST <host_api_url>/Notify
{"event": "boot.progress" | "boot.error" | "instance.info", "payload": "..."}, sent in order by
a thread over a kept-alive connection (no step waits for the host). A failed step stops the boot
with the step named and takes down what the boot started (tunnel, containers); files are written
whole (atomically) or not at all; no secret value is logged.
"""

import copy
import http.client
import json
import logging
import os
import queue
import threading
import time
import urllib.parse

from ansible_collections.dstack.tee.agents.guest import gateway_link, measure
from ansible_collections.dstack.tee.agents.guest.api import GuestApi, NotReady, ServerFailure
from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner
from ansible_collections.dstack.tee.agents.guest.gateway_link import GatewayLink
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils import app_certs, attestation, env_crypt, kdf, wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes, read_json
from ansible_collections.dstack.tee.plugins.module_utils.gateway_client import GatewayClient
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsCertSigner, KmsClient

log = logging.getLogger("dstack.guest.boot")
IMAGES_DIR = "images"  # in the config share: the app's images as docker-archive tarballs (*.tar)
STEPS = ("read-config", "instance-id", "measure", "keys", "measure-system", "env", "gateway", "containers")


class BootFailed(DstackError):
    """A boot step failed; field is the step."""


class HostNotifier:
    """Boot progress to boot.json and, when configured, to the host's HostApi.Notify.

    boot.json is written at once; the host is told by a sender thread, in order, over one kept-alive
    connection, so that no boot step waits for the host's answer. A failed boot waits (a bounded
    time) until the host has its error, before the agent exits."""

    FLUSH_TIMEOUT = 10

    def __init__(self, ctx):
        self.ctx = ctx
        self.state = {"stage": "", "done": False, "error": "", "events": []}
        self.url = ""
        self._queue = queue.Queue()
        self._sender = None
        self._connection = None

    def configure(self, sys_config):
        url = str(sys_config.get("host_api_url") or "")
        self.url = url.rstrip("/") if url.startswith(("http://", "https://")) else ""

    def notify(self, event, payload):
        entry = {"event": event, "payload": payload, "timestamp_ms": int(time.time() * 1000)}
        self.state["events"] = (self.state["events"] + [entry])[-20:]
        atomic_write(self.ctx.paths.boot_state, json.dumps(self.state, indent=2).encode(), mode=0o644)
        if self.url:
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_all, name="host-notifier", daemon=True)
                self._sender.start()
            self._queue.put((event, payload))

    def flush(self, timeout=FLUSH_TIMEOUT):
        """Wait until the host was told everything so far (or `timeout` seconds)."""
        if self._sender is not None:
            told = threading.Event()
            self._queue.put(told)
            told.wait(timeout)

    def _send_all(self):
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._send(*item)

    def _send(self, event, payload):
        body = json.dumps({"event": event, "payload": payload}).encode()
        parts = urllib.parse.urlsplit(self.url)
        while True:
            reused = self._connection is not None
            if not reused:
                kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                self._connection = kind(parts.netloc, timeout=5)
            try:
                self._connection.request("POST", parts.path + "/Notify", body, {"Content-Type": "application/json"})
                response = self._connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    log.warning("could not tell the host %s: HTTP %s %s", event, response.status, answer[:200])
                return
            except (http.client.HTTPException, OSError) as exc:
                self._connection.close()
                self._connection = None
                if not reused:  # a kept connection the host had closed is tried once more, anew
                    log.warning("could not tell the host %s: %s", event, exc)
                    return

    def progress(self, stage, message):
        self.state["stage"] = stage
        log.info("%s: %s", stage, message)
        self.notify("boot.progress", f"{stage}: {message}")

    def failed(self, stage, reason):
        self.state.update(stage=stage, error=reason)
        log.error("boot failed at %s: %s", stage, reason)
        self.notify("boot.error", f"{stage}: {reason}")
        self.flush()

    def done(self):
        self.state.update(done=True, stage="running")
        self.notify("boot.progress", "running")


class Boot:
    """One boot of one CVM. `kms_client` / `runner` may be given (tests, other engines)."""

    def __init__(self, ctx, kms_client=None, runner=None, sockets=None, port_map=None, netns=None,
                 gateway_settings=None, before_containers=None, own_network=False):
        self.ctx = ctx
        self.before_containers = before_containers  # e.g. wait until the socket API the containers mount listens
        self.kms_client = kms_client
        self.runner = runner
        self.sockets = sockets or {}
        self.port_map = port_map
        self.netns = netns
        self.own_network = own_network  # a VM: this namespace is the CVM's own (the gateway's tunnel goes here)
        self.gateway_settings = dict(gateway_settings or {})  # GatewayLink's checker settings (tests)
        self.gateway_link = None
        self.notifier = HostNotifier(ctx)
        self.app = {}
        self.sys_config = {}
        self.app_id = self.instance_id = self.compose_hash = ""
        self.keys = {}
        self.env = []
        self._kms = None
        self._containers = None  # the containers' start, beside the gateway step (_Beside)
        self._prepared = False  # the runner made something before the containers step (its network)
        self._loaded_images = []  # "images/<file> (what the engine loaded)", told with the containers step

    def run(self):
        """Run every step; raise BootFailed naming the step that failed.

        The containers start beside the gateway step (neither needs the other: the app's ports are
        the CVM's either way, the tunnel only adds a way in); progress is still told in STEPS order,
        and a failed boot takes down what it started (the tunnel and the containers)."""
        self._power_on()
        try:
            for step in STEPS:
                if step == "measure":
                    self._prepare_containers()
                    if self._gateway_used():
                        wireguard.preload_pyroute2()  # the gateway step's links, off its path
                if step == "gateway":
                    self._containers = _Beside(self._containers_up)
                try:
                    getattr(self, "step_" + step.replace("-", "_"))()
                except DstackError as exc:
                    self._failed(step, str(exc), str(exc))
                except OSError as exc:
                    self._failed(step, f"{exc.strerror or exc} ({getattr(exc, 'filename', '')})", str(exc.strerror or exc))
                except Exception as exc:  # pylint: disable=broad-exception-caught
                    # A bug or a library too old in the image: still a failed step, told to the host, with
                    # what it started taken down (else the agent hangs with the containers half up).
                    log.exception("boot step %s failed unexpectedly", step)
                    what = f"unexpected {type(exc).__name__} (the agent's log has its traceback)"
                    self._failed(step, what, what)
        except BootFailed:
            if self._containers is not None or self._prepared:
                if self._containers is not None:
                    self._containers.join()
                try:
                    self._runner().down()
                except (DstackError, OSError) as exc:
                    log.warning("could not take the containers down after the failed boot: %s", exc)
            raise
        self.notifier.done()
        return self

    def _failed(self, step, told, reason):
        self.close()  # a failed boot leaves no tunnel behind
        self.notifier.failed(step, told)
        raise BootFailed(step, reason) from None

    def _power_on(self):
        """A simulated TD starts with an empty RTMR3 and runtime log, as a real one does, and MRTD and
        RTMR0-2 measuring the OS image its vm_config names (tdx_sim.launch_measurements)."""
        reset = getattr(self.ctx.provider, "reset_rtmrs", None)
        if reset is not None:
            try:
                vm_config = self.ctx.vm_config()
            except DstackError:
                vm_config = ""  # the read-config step reports it
            reset(vm_config)
            if os.path.exists(self.ctx.paths.runtime_log):
                os.unlink(self.ctx.paths.runtime_log)

    # ---- the steps ---------------------------------------------------------------------------

    def step_read_config(self):
        self.sys_config = self.ctx.sys_config()
        self.notifier.configure(self.sys_config)
        self.app = compose.validate(self.ctx.app_compose())
        self.compose_hash = self.ctx.compose_hash()
        self.notifier.progress("read-config", f"app {self.app['name']!r}, compose_hash {self.compose_hash}")

    def step_instance_id(self):
        provider = compose.key_provider_of(self.app)
        given = self._instance_info().get("app_id", "")
        # Without a KMS the measured app id is always compose_hash[0:20] (dstack-reference 6.2).
        self.app_id = compose.app_id_for(self.compose_hash, given if provider == "kms" else None)
        if self.app.get("no_instance_id"):
            self.instance_id, seed = "", ""
        else:
            seed = self._instance_info().get("instance_id_seed") or self.ctx.instance().get("instance_id_seed")
            if provider == "none" or not seed:
                seed = os.urandom(20).hex()
            self.instance_id = compose.instance_id_for(seed, self.app_id)
        info = {"instance_id_seed": seed, "instance_id": self.instance_id, "app_id": self.app_id}
        atomic_write(self.ctx.paths.instance, json.dumps(info).encode(), mode=0o600)
        self.notifier.notify("instance.info", json.dumps(info))
        self.notifier.progress("instance-id", f"app_id {self.app_id}, instance_id {self.instance_id or '(none)'}")

    def _instance_info(self):
        info = read_json(self.ctx.paths.instance_info, ".instance_info", missing_ok=True)
        return info if isinstance(info, dict) else {}

    def step_measure(self):
        if self.ctx.runtime_events():
            raise DstackError("rtmr3", "already holds runtime events: a boot runs once per power-on")
        provider = compose.key_provider_of(self.app)
        provider_id = self._kms_root_id() if provider == "kms" else ""
        os_image = _vm_config_field(self.ctx.vm_config(), "os_image_hash")
        measure.measure_identity(self.ctx, self.app_id, self.compose_hash, self.instance_id, os_image,
                                 provider, provider_id)
        self.notifier.progress("measure", "app-id, compose-hash, instance-id, os-image-hash and key-provider "
                                          "measured into RTMR3")

    def _kms_root_id(self):
        """The KMS's key-provider id (its root CA's public key), checked against a pinned one."""
        self._kms = self._kms or self.kms_client or self._kms_client()
        provider_id = app_certs.key_provider_id(self._kms.get_meta().get("ca_cert", ""))
        pinned = (self.app.get("key_provider_id") or "").lower().removeprefix("0x")
        if pinned and pinned != provider_id:
            raise DstackError("key_provider_id", "the KMS's root key is not the one app-compose pins")
        return provider_id

    def step_keys(self):
        provider = compose.key_provider_of(self.app)
        if provider == "kms":
            self.keys = self._keys_from_kms()
        elif provider == "none":
            seed = os.urandom(32)
            derived = kdf.seed_app_keys(seed)
            self.keys = {"disk_crypt_key": derived["disk_crypt_key"].hex(), "env_crypt_key": "",
                         "k256_key": derived["k256_key"].hex(), "k256_signature": "", "gateway_app_id": "",
                         "ca_cert": "", "key_provider": {"None": {"key": seed.hex()}}}
        else:
            raise DstackError("key_provider", f"{provider!r} is not available here (no SGX local key provider)")
        self.ctx.write_app_keys(self.keys)
        self.notifier.progress("keys", f"app keys from key provider {provider}")

    def _keys_from_kms(self):
        client = self._kms or self.kms_client or self._kms_client()
        measured = self.ctx.runtime_events()
        keys = client.get_app_key(self.ctx.provider, json.dumps(self.ctx.event_log()), self.ctx.vm_config())
        provider = keys.get("key_provider") or {}
        expected = next((json.loads(e.payload).get("id", "") for e in measured if e.name == "key-provider"), "")
        if str(provider.get("id", "")).lower() != expected:
            raise DstackError("key_provider", "the keys come from another KMS root than the one measured")
        return {"disk_crypt_key": keys["disk_crypt_key"], "env_crypt_key": keys["env_crypt_key"],
                "k256_key": keys["k256_key"], "k256_signature": keys["k256_signature"],
                "gateway_app_id": keys.get("gateway_app_id", ""), "ca_cert": keys.get("ca_cert", ""),
                "os_image_hash": keys.get("os_image_hash", ""),
                "key_provider": {"Kms": {"url": client.url, "pubkey": provider.get("id", "")}}}

    def _kms_client(self):
        urls = self.sys_config.get("kms_urls") or []
        if not urls:
            raise DstackError("kms_urls", "are missing from .sys-config.json, and the app uses the KMS")
        url = urls[0]
        ca_pem = self.sys_config.get("kms_ca_cert")
        if ca_pem:
            path = self.ctx.paths.work("kms-ca.crt")
            atomic_write(path, ca_pem.encode(), mode=0o644)
            return KmsClient(url, ca_cert=path)
        log.warning("no kms_ca_cert in .sys-config.json: the KMS's HTTPS certificate is not checked; the "
                    "keys are still sealed to this boot, and the KMS root is measured (key-provider)")
        return KmsClient(url, validate_certs=False)

    def step_measure_system(self):
        measure.measure_system(self.ctx, storage_fs=self.app.get("storage_fs") or "ext4")
        self.notifier.progress("measure-system", "storage-fs, system-ready measured")

    def step_env(self):
        blob = read_bytes(self.ctx.paths.encrypted_env, ".encrypted-env", missing_ok=True)
        if blob is None:
            self.env = []
            self._write_env()
            self.notifier.progress("env", "no encrypted env")
            return
        if not self.keys.get("env_crypt_key"):
            raise DstackError(".encrypted-env", "is present but this key provider gives no env key")
        items = env_crypt.decrypt_env(blob, parse_hex(self.keys["env_crypt_key"], "env_crypt_key", length=32),
                                      ".encrypted-env")
        self.env, dropped = env_crypt.filter_allowed(items, self.app.get("allowed_envs") or [])
        for name in dropped:
            log.warning("env: dropped %s: not in allowed_envs", name)
        self._write_env()
        self.notifier.progress("env", f"{len(self.env)} variables ({', '.join(k for k, _v in self.env) or 'none'})"
                               + (f", dropped {', '.join(dropped)}" if dropped else ""))

    def _write_env(self):
        atomic_write(self.ctx.paths.decrypted_env, env_crypt.render_dotenv(self.env), mode=0o600)
        atomic_write(self.ctx.paths.decrypted_env_json, env_crypt.render_json(self.env), mode=0o600)

    def _gateway_used(self):
        return bool(self.app.get("gateway_enabled") and self.sys_config.get("gateway_urls"))

    def step_gateway(self):
        if not self._gateway_used():
            self.notifier.progress("gateway", "not used")
            return
        urls = self.sys_config["gateway_urls"]
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise DstackError("gateway_urls", "must be a list of https:// URLs")
        link = GatewayLink(self._gateway_client(), urls, self.netns,
                           gateway_link.interface_name(self.instance_id, self.app_id), own_network=self.own_network,
                           **self.gateway_settings)
        try:
            registration = link.connect()
        except BaseException:
            link.close()
            raise
        self.gateway_link = link
        link.start_checker()
        self.notifier.progress("gateway", f"registered with {link.url} (gateway app {registration.gateway['app_id']}): "
                                          f"{registration.client_ip} on {link.interface.name} "
                                          + (f"in netns {self.netns}" if self.netns else "in this VM's network"))

    def _gateway_client(self):
        """GatewayClient over this CVM's own GetTlsKey (the KMS signs, with this CVM's quote), its KMS
        root and gateway_app_id from the app keys, the cache in the work folder. Nothing is asked of
        the KMS or the gateway here (GatewayLink checks the namespace before anything is)."""
        if not self.keys.get("ca_cert") or not self.keys.get("gateway_app_id"):
            raise DstackError("gateway_app_id", "the key provider gave no gateway app id and KMS root: the gateway's "
                                                "attested identity cannot be checked (use key_provider kms)")
        signer = self.ctx.cert_signer
        if signer is None:
            signer = KmsCertSigner(self._kms or self.kms_client or self._kms_client(), self.ctx)
        signing_ctx = copy.copy(self.ctx)
        signing_ctx.cert_signer = signer
        api = GuestApi(signing_ctx)

        def get_tls_key(params):
            try:
                return api.get_tls_key(params)
            except (NotReady, ServerFailure) as exc:
                raise DstackError("get_tls_key", str(exc)) from None

        trust = attestation.QuoteTrust(self._quote_trust_settings(), self.ctx.paths.work_dir)
        return GatewayClient(self.ctx.paths.work("gateway-cache.json"), get_tls_key, self.keys["ca_cert"], trust,
                             self.keys["gateway_app_id"])

    def _quote_trust_settings(self):
        """What the gateway's quotes are verified under: the simulator's trust where this CVM's own
        quotes are simulated (its state folder, or a no_tee VM's host over the quote channel: the
        platform that signs this VM's quotes signs the gateway's), else Intel's root and the PCCS."""
        sim_state = getattr(self.ctx.provider, "state_dir", None)
        if sim_state:
            return {"mode": "simulation", "sim_state_dir": sim_state}
        platform_trust = getattr(self.ctx.provider, "platform_trust", None)
        if platform_trust is not None:
            root_ca, collateral = platform_trust()
            path = self.ctx.paths.work("platform-root-ca.der")
            atomic_write(path, root_ca, mode=0o644)
            return {"mode": "simulation", "root_ca": path, "collateral": attestation.load_collateral(collateral)}
        return {"mode": "production", "pccs_url": self.sys_config.get("pccs_url") or ""}

    def close(self):
        """Stop the gateway checker and take the WireGuard interface down (the agent is stopping)."""
        if self.gateway_link is not None:
            self.gateway_link.close()
            self.gateway_link = None

    def _runner(self):
        if self.runner is None:
            self.runner = ComposeRunner(f"dstack-{(self.instance_id or self.app_id)[:12]}", self.ctx.paths.work_dir)
        return self.runner

    def _prepare_containers(self):
        """What the runner can make before the containers step, in the background (ComposeRunner.prepare:
        the project's network), once the compose is read and the instance id known (the project's name)."""
        prepare = getattr(self._runner(), "prepare", None)
        if prepare is not None:
            prepare(self.app["docker_compose_file"])
            self._prepared = True

    def _containers_up(self):
        """The containers step's work, in a thread beside the gateway step (so it tells no progress)."""
        if self.app.get("runner", "docker-compose") not in ("docker-compose", "nerdctl-compose"):
            raise DstackError("runner", f"{self.app.get('runner')!r} is not supported by this agent")
        runner = self._runner()
        self._load_images(runner)
        if self.before_containers is not None:
            self.before_containers()
        runner.up(self.app["docker_compose_file"], dict(self.env), self.sockets, self.port_map)

    def _load_images(self, runner):
        """The app's images the host gave in the config share (images/*.tar, docker-archive), loaded
        before compose up, in name order. Trust: the compose (measured, by its hash) names each image
        by reference; a loaded image is as trusted as the same tag pulled from a registry through the
        host's network, which the host controls as well (pin digests in the compose for more)."""
        folder = self.ctx.paths.config(IMAGES_DIR)
        if not os.path.isdir(folder):
            return
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".tar") or name.startswith("."):
                continue
            loaded = runner.load_image(os.path.join(folder, name), f"{IMAGES_DIR}/{name}")
            log.info("containers: image %s/%s: %s", IMAGES_DIR, name, loaded)
            self._loaded_images.append(f"{IMAGES_DIR}/{name} ({loaded})")

    def step_containers(self):
        self._containers.wait()
        images = f"; images loaded: {', '.join(self._loaded_images)}" if self._loaded_images else ""
        self.notifier.progress("containers", "compose services started" + images)


class _Beside:
    """Work in a thread of its own; wait() returns when it is done, raising what it raised."""

    def __init__(self, work):
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(work,), name="boot-beside", daemon=True)
        self._thread.start()

    def _run(self, work):
        try:
            work()
        except BaseException as exc:  # pylint: disable=broad-exception-caught  # raised again by wait()
            self._error = exc

    def join(self):
        self._thread.join()

    def wait(self):
        self._thread.join()
        if self._error is not None:
            raise self._error


def _vm_config_field(vm_config, name):
    try:
        return str(json.loads(vm_config or "{}").get(name, ""))
    except (ValueError, AttributeError):
        return ""
