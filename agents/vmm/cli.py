# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`dstack-vmm`: the host VM manager.

    dstack-vmm serve [--config vmm.toml] [--run-path DIR] [--listen HOST:PORT] [--backend process|libvirt]
                     [--kms-url URL] [--kms-ca-cert FILE] [--sim-state DIR] [--token TOKEN ...]
                     [--base-domain DOMAIN] [--os-image-hash HEX] [--server-name NAME ...]
                     [--allowed-host-address IP ...] [--max-vcpu N] [--max-memory-mb N]
                     [--max-disk-size-gb N] [--max-name-length N] [--max-cvm-number N]
                     [--max-log-followers N] [--api-threads N] [--cvm-netns]
                     [--libvirt-uri URI] [--image-path DIR] [--libvirt-domain-type kvm|qemu]
                     [--no-preload-images]

Serves the JSON API (/prpc/Vmm.*), the web UI (/) and /logs with gunicorn (one worker: the VMM
serializes changes to a VM; api_threads threads for the API and the host API, and
max_log_followers more for /logs followers, so that following never takes the API's). Listening
on anything but loopback requires a token (--token, or DSTACK_VMM_TOKENS=comma,separated). On
start it finds the VMs of its run path again and starts those that should run.
--cvm-netns (vmm.toml cvm_netns = true; process backend, as root): each CVM in its own network
namespace with a veth to the host (cvm_netns_range, default 10.213.0.0/16, one /30 each), the
guest agent run with --netns; needed by CVMs that use the gateway.
The libvirt backend (vmm.toml libvirt_uri or --libvirt-uri, default qemu:///system; image_path or
--image-path, default ./images): domains of type libvirt_domain_type (--libvirt-domain-type), kvm
(default) or qemu (TCG, for a host whose /dev/kvm is PVM and runs a stock guest kernel ~100x slower
than TCG: README, machine notes). Its VMs are on QEMU's user network, where the host's loopback is
10.0.2.2: the KMS, gateway and host API URLs on loopback are given to them so. Before a VM starts,
the images of its compose that the host's podman holds are saved into its config share
(images/*.tar, loaded by the guest); vmm.toml preload_images = false (--no-preload-images) leaves
every image to the guest to pull. A no_tee VM's quotes come from the
VMM over the VM's org.dstack.quote virtio-serial port, signed by the simulated platform in
sim_state_dir (as the process backend's CVMs are).

    dstack-vmm logs NAME [--follow] [--lines N] [--ch stdout|stderr|serial] [--service SERVICE]
                    [--url URL] [--token TOKEN] [--ca-cert FILE]

Prints a CVM's log from the VMM's /logs (NAME: the VM's name or id): by default its stdout, the
app's containers' output (each line prefixed `web-1  | `), --ch stderr the guest agent's own;
--service only that compose service's lines; --follow then new lines until Ctrl-C. The VMM is
--url (default $DSTACK_VMM_URL, else http://127.0.0.1:9080), with --token (default
$DSTACK_VMM_TOKEN, else the first of $DSTACK_VMM_TOKENS, which serve reads) when it requires one.
"""

import argparse
import http.client
import json
import logging
import os
import sys
from urllib.parse import urlsplit

from ansible_collections.dstack.tee.agents.cli_support import run_cli
from ansible_collections.dstack.tee.agents.vmm.service import is_loopback_host
from ansible_collections.dstack.tee.agents.wsgi import run_gunicorn
from ansible_collections.dstack.tee.plugins.module_utils import service_log
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_toml
from ansible_collections.dstack.tee.plugins.module_utils.prpc import Unauthorized
from ansible_collections.dstack.tee.plugins.module_utils.vmm_client import VmmClient

KEYS = ("run_path", "listen", "backend", "kms_urls", "kms_ca_cert", "sim_state_dir", "auth_tokens", "base_domain",
        "os_image_hash", "gateway_urls", "libvirt_uri", "libvirt_domain_type", "image_path", "host_api_base", "server_names",
        "allowed_host_addresses", "max_allocable_vcpu", "max_allocable_memory_in_mb", "max_disk_size_gb",
        "max_name_length", "max_cvm_number", "max_log_followers", "api_threads", "max_request_bytes", "cvm_netns",
        "cvm_netns_range", "preload_images")
API_THREADS = 16
DEFAULT_URL = "http://127.0.0.1:9080"


def load_config(args):
    config = read_toml(args.config, "--config") if args.config else {}
    flags = {"run_path": args.run_path, "listen": args.listen, "backend": args.backend,
             "kms_urls": [args.kms_url] if args.kms_url else None, "kms_ca_cert": args.kms_ca_cert,
             "sim_state_dir": args.sim_state, "auth_tokens": args.token or None, "base_domain": args.base_domain,
             "os_image_hash": args.os_image_hash, "server_names": args.server_name or None,
             "allowed_host_addresses": args.allowed_host_address or None, "max_allocable_vcpu": args.max_vcpu,
             "max_allocable_memory_in_mb": args.max_memory_mb, "max_disk_size_gb": args.max_disk_size_gb,
             "max_name_length": args.max_name_length, "max_cvm_number": args.max_cvm_number,
             "max_log_followers": args.max_log_followers, "api_threads": args.api_threads,
             "cvm_netns": True if getattr(args, "cvm_netns", False) else None,
             "gateway_urls": getattr(args, "gateway_url", None) or None,
             "libvirt_uri": getattr(args, "libvirt_uri", None), "image_path": getattr(args, "image_path", None),
             "libvirt_domain_type": getattr(args, "libvirt_domain_type", None),
             "preload_images": False if getattr(args, "no_preload_images", False) else None}
    config.update({k: v for k, v in flags.items() if v is not None})
    if os.environ.get("DSTACK_VMM_TOKENS") and not config.get("auth_tokens"):
        config["auth_tokens"] = [t for t in os.environ["DSTACK_VMM_TOKENS"].split(",") if t]
    config.setdefault("run_path", "run")
    config.setdefault("listen", "127.0.0.1:9080")
    config.setdefault("backend", "process")
    config["run_path"] = os.path.abspath(config["run_path"])
    config.setdefault("sim_state_dir", os.path.join(config["run_path"], "tdx-sim"))
    return config


def make_backend(config):
    if config["backend"] == "process":
        from ansible_collections.dstack.tee.agents.vmm.backends.process import ProcessBackend  # pylint: disable=import-outside-toplevel
        cvm_netns = config.get("cvm_netns", False)
        if not isinstance(cvm_netns, bool):
            raise DstackError("cvm_netns", "must be true or false")
        return ProcessBackend(config["run_path"], config["sim_state_dir"], cvm_netns=cvm_netns,
                              cvm_netns_range=config.get("cvm_netns_range") or "10.213.0.0/16")
    if config["backend"] == "libvirt":
        from ansible_collections.dstack.tee.agents.vmm.backends.libvirt import LibvirtBackend  # pylint: disable=import-outside-toplevel
        # kvm (hardware virtualization), or qemu (TCG) where /dev/kvm cannot run a stock guest kernel
        # at speed: a PVM host (kvm_pvm; README, machine notes).
        domain_type = config.get("libvirt_domain_type", "kvm")
        if domain_type not in ("kvm", "qemu"):
            raise DstackError("libvirt_domain_type", f"must be kvm or qemu, not {str(domain_type)[:20]!r}")
        preload_images = config.get("preload_images", True)
        if not isinstance(preload_images, bool):
            raise DstackError("preload_images", "must be true or false")
        return LibvirtBackend(config.get("libvirt_uri", "qemu:///system"), image_dir=config.get("image_path", "images"),
                              domain_type=domain_type, sim_state_dir=config.get("sim_state_dir"),
                              preload_images=preload_images)
    raise DstackError("backend", f"unknown backend {str(config['backend'])[:20]!r} (expected process or libvirt)")


def cmd_serve(args):
    from ansible_collections.dstack.tee.agents.vmm.app import create_app  # pylint: disable=import-outside-toplevel
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(args)
    host, _sep, port = config["listen"].rpartition(":")
    if not host or not port.isdigit():
        raise DstackError("--listen", "must be HOST:PORT")
    if not is_loopback_host(host) and not config.get("auth_tokens"):
        raise DstackError("--token", f"is required when listening on {host} (anything but loopback)")
    connect = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host.strip("[]")
    config.setdefault("host_api_base", f"http://{connect}:{port}/host-api")
    api_threads = config.get("api_threads", API_THREADS)
    if isinstance(api_threads, bool) or not isinstance(api_threads, int) or not 1 <= api_threads <= 256:
        raise DstackError("api_threads", "must be an integer 1 to 256")
    app = create_app(config, make_backend(config))
    app.extensions["dstack_vmm"].recover()
    print(f"dstack-vmm: {config['backend']} backend, run path {config['run_path']}, serving http://{host}:{port}/"
          + (" (token required)" if config.get("auth_tokens") else ""), file=sys.stderr)
    # Log followers hold a thread each for as long as they follow: they get threads of their own.
    threads = api_threads + app.extensions["dstack_vmm_followers"].limit
    run_gunicorn(app, bind=f"{host}:{port}", workers=1, threads=threads, timeout=0, accesslog="-", errorlog="-",
                 loglevel="info")


class LogsClient(VmmClient):
    """The VMM client, plus /logs (text, streamed) over the same connection settings; errors name
    the command's flags."""

    def __init__(self, url, token=None, ca_cert=None, timeout=30.0):
        super().__init__(url, token=token, ca_cert=ca_cert, timeout=timeout)
        self.field = "--url"

    def call(self, method, params=None):
        try:
            return super().call(method, params)
        except Unauthorized:
            raise self._unauthorized() from None

    def _unauthorized(self):
        return DstackError("--token", f"the VMM at {self.url} wants a valid token (--token, or DSTACK_VMM_TOKEN)")

    def logs(self, params, out):
        """Copy /logs's answer to `out` (a binary stream) as it comes; with follow, until it ends."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        conn, _reused = self._connection()
        try:
            conn.request("POST", urlsplit(self.url).path + "/logs", body=json.dumps(params).encode(), headers=headers)
            if params.get("follow"):
                conn.sock.settimeout(None)  # a quiet log is no error: follow until the VMM or Ctrl-C ends it
            answer = conn.getresponse()
            if answer.status != 200:
                self._refused(answer)
            while True:
                chunk = answer.read1(64 * 1024)
                if not chunk:
                    return
                out.write(chunk)
                out.flush()
        except (OSError, http.client.HTTPException) as exc:
            raise DstackError("--url", f"cannot read the logs from the VMM at {self.url}: "
                                       f"{getattr(exc, 'strerror', None) or str(exc) or type(exc).__name__}") from None
        finally:
            self.close()

    def _refused(self, answer):
        try:
            reason = json.loads(answer.read()).get("error", "")
        except (ValueError, AttributeError):
            reason = ""
        if answer.status == 401:
            raise self._unauthorized()
        raise DstackError("logs", f"the VMM at {self.url} answered HTTP {answer.status}: {reason or answer.reason}")


def _client_settings(args):
    url = args.url or os.environ.get("DSTACK_VMM_URL") or DEFAULT_URL
    token = args.token or os.environ.get("DSTACK_VMM_TOKEN") or \
        next((t for t in os.environ.get("DSTACK_VMM_TOKENS", "").split(",") if t), None)
    return url, token


def vm_id_of(client, name):
    """The id of the VM named `name` (or with that id)."""
    vms = client.call("Status", {"brief": True}).get("vms", [])
    for vm in vms:
        if name in (vm.get("id"), vm.get("name")):
            return vm["id"]
    names = ", ".join(repr(vm.get("name")) for vm in vms[:20]) or "none"
    raise DstackError("NAME", f"no VM named {name[:80]!r} (nor with that id) on the VMM at {client.url}; its VMs: {names}")


def cmd_logs(args):
    url, token = _client_settings(args)
    service = service_log.check_service(args.service, "--service")
    client = LogsClient(url, token=token, ca_cert=args.ca_cert, timeout=30)
    params = {"id": vm_id_of(client, args.name), "ch": args.ch, "lines": args.lines, "follow": args.follow}
    if service:
        params["service"] = service
    try:
        client.logs(params, sys.stdout.buffer)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader went (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return None


def _lines(text):
    if not text.isdigit() or not 1 <= int(text) <= 10000:
        raise argparse.ArgumentTypeError(f"{text[:16]!r} is not a number of lines from 1 to 10000")
    return int(text)


def build_parser():
    parser = argparse.ArgumentParser(prog="dstack-vmm", description="The dstack.tee host VM manager.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the VMM API and web UI")
    serve.add_argument("--config", help="a vmm.toml")
    serve.add_argument("--run-path", help="where VM run directories live (default ./run)")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:9080)")
    serve.add_argument("--backend", choices=["process", "libvirt"], help="CVM backend (default process)")
    serve.add_argument("--kms-url", help="the KMS the CVMs get their keys from")
    serve.add_argument("--kms-ca-cert", help="the KMS root CA certificate (root-ca.crt)")
    serve.add_argument("--sim-state", help="the simulated TDX state directory (process backend)")
    serve.add_argument("--token", action="append", help="an API token (repeatable)")
    serve.add_argument("--base-domain", help="the gateway's base domain, for app URLs")
    serve.add_argument("--gateway-url", action="append",
                       help="a gateway's control API the CVMs register with (.sys-config.json gateway_urls; repeatable)")
    serve.add_argument("--os-image-hash", help="the OS image hash the CVMs report (vm_config)")
    serve.add_argument("--server-name", action="append",
                       help="a name this VMM is reached by (Host header), besides its listen address and localhost "
                            "(repeatable; vmm.toml server_names)")
    serve.add_argument("--allowed-host-address", action="append",
                       help="an IP address CVM ports may be published on (repeatable; default: the listen address; "
                            "loopback is always allowed; vmm.toml allowed_host_addresses)")
    serve.add_argument("--max-vcpu", type=int, help="most vCPUs per CVM (default 20; max_allocable_vcpu)")
    serve.add_argument("--max-memory-mb", type=int,
                       help="most memory per CVM in MB (default 100000; max_allocable_memory_in_mb)")
    serve.add_argument("--max-disk-size-gb", type=int, help="largest disk per CVM in GB (default 1000)")
    serve.add_argument("--max-name-length", type=int, help="longest CVM name (default 64)")
    serve.add_argument("--max-cvm-number", type=int, help="most CVMs on this VMM (default 100)")
    serve.add_argument("--max-log-followers", type=int,
                       help="most /logs followers at once (default 8; more get 429)")
    serve.add_argument("--api-threads", type=int, help="threads for the API and the host API (default 16)")
    serve.add_argument("--cvm-netns", action="store_true", default=None,
                       help="process backend: each CVM in its own network namespace with a veth to the host "
                            "(vmm.toml cvm_netns; default off; needed by CVMs that use the gateway)")
    serve.add_argument("--libvirt-uri", help="libvirt backend: the libvirt connection (default qemu:///system; "
                                             "vmm.toml libvirt_uri)")
    serve.add_argument("--image-path", help="libvirt backend: the folder of guest images, one folder each "
                                            "(default ./images; vmm.toml image_path)")
    serve.add_argument("--libvirt-domain-type", choices=["kvm", "qemu"],
                       help="libvirt backend: kvm (default), or qemu (TCG) where /dev/kvm cannot run the guest "
                            "(vmm.toml libvirt_domain_type)")
    serve.add_argument("--no-preload-images", action="store_true", default=None,
                       help="libvirt backend: do not save the compose's images from the host's podman into the VM's "
                            "config share; the guest pulls them (vmm.toml preload_images = false)")
    serve.set_defaults(func=cmd_serve)
    logs = sub.add_parser("logs", help="print a CVM's log: its containers' output, or the guest agent's")
    logs.add_argument("name", metavar="NAME", help="the VM's name or id")
    logs.add_argument("-f", "--follow", action="store_true", help="then print new lines as they come, until Ctrl-C")
    logs.add_argument("-n", "--lines", type=_lines, default=200, help="the last N lines first (default 200, at most 10000)")
    logs.add_argument("--ch", choices=["stdout", "stderr", "serial"], default="stdout",
                      help="stdout: the app's containers' output (default); stderr: the guest agent's own log; "
                           "serial: a VM's serial console (libvirt backend)")
    logs.add_argument("--service", help="only the lines of this compose service's containers")
    logs.add_argument("--url", help=f"the VMM (default: $DSTACK_VMM_URL, else {DEFAULT_URL})")
    logs.add_argument("--token", help="the VMM's API token, when it requires one (default: $DSTACK_VMM_TOKEN, else the "
                                      "first of $DSTACK_VMM_TOKENS)")
    logs.add_argument("--ca-cert", help="the CA certificate to check an https:// VMM against")
    logs.set_defaults(func=cmd_logs)
    return parser


def main(argv=None):
    return run_cli("dstack-vmm", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
