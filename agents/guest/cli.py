# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`dstack-guest-agent`: the in-CVM agent's command.

  dstack-guest-agent serve --config-dir DIR --work-dir DIR [--socket PATH] [--tappd-socket PATH]
                           [--socket-mode 0666] [--tee auto|tdx|sim] [--sim-state DIR]
                           [--kms-url URL [--kms-ca-cert FILE]] [--workers N]
      the socket API (agents/guest/api.py) over what the boot left in the work folder;
      sockets default to /var/run/dstack.sock and /var/run/tappd.sock (--tappd-socket '' for none);
      GetTlsKey certificates come from the KMS's SignCert when --kms-url is given

  dstack-guest-agent simulate [--socket PATH] [--tappd-socket PATH] [--state-dir DIR] [--compose FILE]
                              [--name NAME] [--socket-mode 0666]
      a standalone simulator for app developers: a whole simulated CVM whose quotes verify
      (under the simulated root), booted by the real boot (agents/guest/boot.py, no containers
      started) with a local KMS (module_utils/local_kms.py); serves until SIGTERM/SIGINT.
      Defaults: ./dstack.sock, tappd.sock beside it, state in ./.dstack-sim. State directory:
        tdx-sim/      the simulated TDX platform (SimTdx): its root CA and collateral verify quotes
                      (dstack-verify --sim-state STATE/tdx-sim)
        kms/          the local KMS root keys (module_utils/root_keys.py's files, as a KMS keeps them)
        config/       the config share: app-compose.json, .sys-config.json
        work/         the work folder, as the boot leaves it (.appkeys.json 0600, runtime_events.log,
                      instance.json, rtmrs.json, boot.json, ...)
      The platform, the KMS root keys and the instance id are made once and kept; each start is a
      power-on that boots again (the same measurements and keys). A changed --compose or --name
      makes a new app (new app id, keys and measurements) on the same simulated platform and KMS.

  dstack-guest-agent run --config-dir DIR --work-dir DIR [serve's options] [--project NAME]
                         [--port VM_PORT=HOST:PORT ...] [--engine auto|docker|podman|none] [--netns NAME | --own-network]
                         [--worker-port 8090]
      a CVM's main process: serves the socket API, boots the app (agents/guest/boot.py: measure,
      keys from the KMS, env, gateway, containers), and keeps it running until SIGTERM, when it takes
      the containers down (and the gateway tunnel). A failed boot exits with code 2 and the failed
      step named. The socket API (and the Worker API) are children forked from `run` once it has
      imported what they run, so none imports it all again; the boot goes on beside their start
      and waits for the socket API (it tells `run` on a pipe when it listens) only before the
      containers, which mount its socket. --netns NAME: the CVM's own network namespace (/run/netns/NAME, made by the VMM):
      the agent itself stays in the host's (its KMS, host API and the gateway's control API are
      reached from there, as a VM's agent reaches them over its NIC); the WireGuard interface of the
      gateway step and the app's containers (podman, run inside it) are put in NAME. The gateway
      step needs it, or --own-network in a VM (whose network is the CVM's own: the WireGuard interface
      goes up in the agent's namespace, and the public Worker API listens on 0.0.0.0:--worker-port of
      the VM, which the gateway reaches through the tunnel). With --netns, too: the public Worker API (agents/guest/worker.py) on
      0.0.0.0:--worker-port (8090) inside NAME, refused on NAME's eth0 (the host's way in) unless a
      --port maps it; and each --port VM_PORT=HOST_ADDR:HOST_PORT is a TCP forwarder on
      HOST_ADDR:HOST_PORT here to VM_PORT of NAME's eth0 address (agents/guest/netns_ports.py),
      listening before the boot and closed with the agent.

  dstack-guest-agent serve-worker --config-dir DIR --work-dir DIR --fd N [--tee ...] [--sim-state DIR]
                                  [--kms-url URL [--kms-ca-cert FILE]] [--threads N]
                                  [--project NAME --engine E --netns NAME]
      the Worker API on an inherited listening TCP socket (run --netns runs the same in a child); with the
      compose project, /logs/<container> when app-compose's public_logs is true

Subcommands are registered in COMMANDS (name, help, add_arguments, run).
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time

from ansible_collections.dstack.tee.agents.cli_support import run_cli
from ansible_collections.dstack.tee.agents.guest import server, worker
from ansible_collections.dstack.tee.agents.guest.context import GuestContext
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes, read_text

PROG = "dstack-guest-agent"
SIM_STATE_DIR = ".dstack-sim"
SIM_APP_NAME = "dstack-sim-app"
SIM_OS_IMAGE_HASH = hashlib.sha256(b"dstack.tee simulated guest image").hexdigest()
SIM_VM_CONFIG = {"spec_version": 1, "os_image_hash": SIM_OS_IMAGE_HASH, "cpu_count": 2,
                 "memory_size": 2 * 1024 ** 3, "num_gpus": 0, "num_nvswitches": 0, "hotplug_off": False}
SAMPLE_COMPOSE = """\
services:
  app:
    image: nginx:1.27-alpine
    ports:
      - "8080:80"
    volumes:
      - /var/run/dstack.sock:/var/run/dstack.sock
"""


def _say(message):
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _mode_argument(text):
    try:
        return server.parse_mode(text)
    except DstackError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def add_socket_arguments(parser, socket_default, tappd_default, tappd_help):
    parser.add_argument("--socket", default=socket_default, help=f"the DstackGuest API socket (default {socket_default})")
    parser.add_argument("--tappd-socket", default=tappd_default, help=tappd_help)
    parser.add_argument("--socket-mode", default="0666", type=_mode_argument,
                        help="the sockets' mode, octal (default 0666: containers running as any user connect)")
    parser.add_argument("--workers", type=int, default=server.DEFAULT_WORKERS, help="gunicorn worker processes (default 1)")


def _serve(ctx, args, on_ready):
    from ansible_collections.dstack.tee.agents.guest.api import create_app  # pylint: disable=import-outside-toplevel
    app = create_app(ctx)
    server.serve(app, [args.socket, args.tappd_socket], mode=args.socket_mode, workers=args.workers, on_ready=on_ready)


# ---- serve --------------------------------------------------------------------------------------

def add_context_arguments(parser):
    """What opens the CVM's context (open_context): serve, serve-worker and run take them."""
    parser.add_argument("--config-dir", required=True, help="the config share (app-compose.json, .sys-config.json, ...)")
    parser.add_argument("--work-dir", required=True, help="the guest's work folder (.appkeys.json, runtime_events.log, ...)")
    parser.add_argument("--tee", choices=("auto", "tdx", "sim"), default="auto", help="the TEE provider (default auto)")
    parser.add_argument("--sim-state", help="the simulated TDX state directory (with --tee sim, or auto without TDX)")
    parser.add_argument("--kms-url", help="the KMS that signs GetTlsKey certificates (KMS.SignCert, attested)")
    parser.add_argument("--kms-ca-cert", help="the KMS root CA certificate to check its HTTPS against")


def context_argv(args, kms_url=None, kms_ca_cert=None):
    """add_context_arguments' options as argv, for the children `run` starts."""
    argv = ["--config-dir", args.config_dir, "--work-dir", args.work_dir, "--tee", args.tee]
    if args.sim_state:
        argv += ["--sim-state", args.sim_state]
    if kms_url:
        argv += ["--kms-url", kms_url]
        if kms_ca_cert:
            argv += ["--kms-ca-cert", kms_ca_cert]
    return argv


def open_context(args):
    ctx = GuestContext.open(args.config_dir, args.work_dir, tee=args.tee, sim_state_dir=args.sim_state)
    if args.kms_url:
        from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsCertSigner, KmsClient  # pylint: disable=import-outside-toplevel
        ctx.cert_signer = KmsCertSigner(KmsClient(args.kms_url, ca_cert=args.kms_ca_cert), ctx)
    return ctx


def add_serve_arguments(parser):
    add_context_arguments(parser)
    add_socket_arguments(parser, server.DEFAULT_SOCKET, server.DEFAULT_TAPPD_SOCKET,
                         f"the legacy Tappd socket (default {server.DEFAULT_TAPPD_SOCKET}; '' for none)")


def cmd_serve(args):
    ctx = open_context(args)

    def ready(paths):
        _say(f"{ctx.attestation_mode}: serving on {', '.join(paths)}")

    _serve(ctx, args, ready)


# ---- serve-worker -------------------------------------------------------------------------------

def add_serve_worker_arguments(parser):
    add_context_arguments(parser)
    parser.add_argument("--fd", type=int, required=True,
                        help="a listening TCP socket, inherited (run binds it in the CVM's network namespace)")
    parser.add_argument("--threads", type=int, default=worker.DEFAULT_THREADS,
                        help=f"gunicorn threads (default {worker.DEFAULT_THREADS})")
    parser.add_argument("--project", help="the app's compose project (for /logs; default: from the instance id)")
    parser.add_argument("--engine", choices=("auto", "docker", "podman", "none"), default="auto",
                        help="the container engine of the app (for /logs)")
    parser.add_argument("--netns", help="the CVM's network namespace (for /logs: podman runs in it)")


def compose_project(args, ctx):
    """The app's compose project: --project, else dstack-<instance id, 12 hex>."""
    return args.project or "dstack-" + (ctx.instance().get("instance_id") or "app")[:12]


def cmd_serve_worker(args):
    from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner  # pylint: disable=import-outside-toplevel
    ctx = open_context(args)

    def ready():
        _say(f"{ctx.attestation_mode}: Worker API serving on fd {args.fd}")

    def runner():  # made per request: the instance id (the default project) exists once booted
        return ComposeRunner(compose_project(args, ctx), ctx.paths.work_dir, engine=args.engine, netns=args.netns)

    worker.serve(worker.create_worker_app(ctx, runner=runner), args.fd, threads=args.threads, on_ready=ready)


# ---- simulate -----------------------------------------------------------------------------------

def add_simulate_arguments(parser):
    add_socket_arguments(parser, "dstack.sock", None, "the legacy Tappd socket (default: tappd.sock beside --socket; '' for none)")
    parser.add_argument("--state-dir", default=SIM_STATE_DIR, help=f"where the simulated CVM lives (default ./{SIM_STATE_DIR})")
    parser.add_argument("--compose", help="a docker-compose.yaml for the simulated app (default: a small sample)")
    parser.add_argument("--name", default=SIM_APP_NAME, help=f"the app name (default {SIM_APP_NAME})")


def simulated_cvm(state_dir, compose_text=SAMPLE_COMPOSE, name=SIM_APP_NAME, sockets=None):
    """(GuestContext, summary): the simulated CVM in state_dir, powered on and booted.

    What a VMM and a KMS would do around a CVM, done here: the config share is written (again when
    the app changed), the local KMS's root keys are made once (state_dir/kms), and the real boot
    (agents/guest/boot.py: measure, keys, env, containers) runs against that KMS (local_kms) with no
    container engine. Each call is a power-on: RTMR3 is measured afresh, to the same values and keys
    for the same app (the instance id seed is kept). `sockets` are the agent's, for the compose file."""
    # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.guest.boot import Boot
    from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner
    from ansible_collections.dstack.tee.plugins.module_utils import attestation, root_keys
    from ansible_collections.dstack.tee.plugins.module_utils.app_certs import LocalCertSigner
    from ansible_collections.dstack.tee.plugins.module_utils.local_kms import LocalKmsClient

    state_dir = os.path.abspath(state_dir)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    config_dir, work_dir = os.path.join(state_dir, "config"), os.path.join(state_dir, "work")
    sim_state, kms_dir = os.path.join(state_dir, "tdx-sim"), os.path.join(state_dir, "kms")
    os.makedirs(config_dir, mode=0o755, exist_ok=True)
    root, created = root_keys.load_or_create(kms_dir)
    if created:
        _say(f"made the local KMS root keys in {kms_dir}")

    app_compose_bytes = compose.render(compose.build(compose_text, name, key_provider="kms"))
    ctx = GuestContext.open(config_dir, work_dir, tee="sim", sim_state_dir=sim_state)
    made = read_bytes(ctx.paths.app_compose, "app-compose.json", missing_ok=True) != app_compose_bytes
    if made:
        atomic_write(ctx.paths.app_compose, app_compose_bytes, mode=0o644)
    atomic_write(ctx.paths.sys_config, json.dumps({"vm_config": json.dumps(SIM_VM_CONFIG, separators=(",", ":"))},
                                                  indent=2).encode(), mode=0o644)
    kms = LocalKmsClient(root, attestation.QuoteTrust({"mode": "simulation", "sim_state_dir": sim_state}, work_dir),
                         url=f"local:{kms_dir}")
    boot = Boot(ctx, kms_client=kms, runner=ComposeRunner("dstack-sim", work_dir, engine="none"), sockets=sockets).run()
    ctx.cert_signer = LocalCertSigner(root.ca_key, root.ca_cert, boot.app_id)
    return ctx, {"app_id": boot.app_id, "compose_hash": boot.compose_hash, "instance_id": boot.instance_id,
                 "made": made}


def cmd_simulate(args):
    compose_text = read_text(args.compose, "--compose") if args.compose else SAMPLE_COMPOSE
    args.socket = os.path.abspath(args.socket)
    if args.tappd_socket is None:
        args.tappd_socket = os.path.join(os.path.dirname(args.socket), "tappd.sock")
    elif args.tappd_socket:
        args.tappd_socket = os.path.abspath(args.tappd_socket)
    for path in (args.socket, args.tappd_socket):  # a simulator already serving them: its CVM is left alone
        if path:
            server.prepare_socket(path)
    ctx, summary = simulated_cvm(args.state_dir, compose_text, args.name,
                                 sockets={"dstack": args.socket, "tappd": args.tappd_socket or ""})
    _say(f"{'made' if summary['made'] else 'reusing'} simulated CVM in {os.path.abspath(args.state_dir)}: "
         f"app_id {summary['app_id']}, compose_hash {summary['compose_hash']}")

    def ready(paths):
        del paths
        tappd = f" TAPPD_SIMULATOR_ENDPOINT={args.tappd_socket}" if args.tappd_socket else ""
        print(f"{PROG}: simulating a dstack CVM (dstack-sim) on {args.socket}; point the SDK at it with: "
              f"export DSTACK_SIMULATOR_ENDPOINT={args.socket}{tappd}", flush=True)

    _serve(ctx, args, ready)


# ---- run: a CVM's main process (serve + boot) -----------------------------------------------------

def add_run_arguments(parser):
    add_serve_arguments(parser)
    parser.add_argument("--project", help="the compose project name (default: dstack-<instance id>)")
    parser.add_argument("--port", action="append", default=[], metavar="VM_PORT=HOST:PORT",
                        help="publish CVM port VM_PORT on HOST:PORT (the VM's port map; repeatable); with --netns a "
                             "forwarder on HOST:PORT to VM_PORT of the CVM's eth0 address")
    parser.add_argument("--engine", choices=("auto", "docker", "podman", "none"), default="auto",
                        help="the container engine (default: docker when an engine answers, else podman; none: start "
                             "no containers, the workload runs beside the agent)")
    parser.add_argument("--netns", help="the CVM's network namespace (/run/netns/NAME): its WireGuard interface and "
                                        "containers go there (podman); required by the gateway step")
    parser.add_argument("--own-network", action="store_true",
                        help="the agent runs in the CVM's own network (a VM): the gateway step's WireGuard interface "
                             "goes up here (not with --netns)")
    parser.add_argument("--worker-port", type=_tcp_port, default=worker.WORKER_PORT,
                        help=f"with --netns or --own-network: the public Worker API's port in the namespace or the VM "
                             f"(default {worker.WORKER_PORT})")


def _tcp_port(text):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text[:16]!r} is not a TCP port (1-65535)")
    return int(text)


def _port_map(entries):
    ports = {}
    for entry in entries:
        vm_port, sep, host = entry.partition("=")
        if not sep or not vm_port.isdigit() or not 0 < int(vm_port) < 65536 or ":" not in host:
            raise DstackError("--port", f"{entry!r} is not VM_PORT=HOST:PORT (VM_PORT 1-65535)")
        ports[int(vm_port)] = host
    return ports


class _Child:
    """A child forked from this process (so with what the boot imported already, where a new
    interpreter would import it again), waited on through a pidfd, without polling.
    Its pidfd stays open while this process lives: a signal sent through it never reaches another
    process that took the pid."""

    def __init__(self, name, pid):
        self.name = name
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.parent = os.getpid()
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped meanwhile by the SIGTERM handler's poll
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        """The exit code, or None when the child still runs after `timeout` seconds."""
        import select  # pylint: disable=import-outside-toplevel
        if self.poll() is None:
            select.select([self.pidfd], [], [], timeout)
        return self.poll()

    def _signal(self, signum):
        # Only from `run` itself: a process forked from it later (pyroute2 forks helpers into
        # network namespaces) holds the pidfd too, and must never stop the APIs.
        if self.returncode is None and os.getpid() == self.parent:
            try:
                signal.pidfd_send_signal(self.pidfd, signum)
            except ProcessLookupError:
                pass

    def terminate(self):
        self._signal(signal.SIGTERM)

    def kill(self):
        self._signal(signal.SIGKILL)


def _fork(name, run, let_go=()):
    """Run `run()` in a child process forked from this one; its exit code as `run_cli` gives it
    (0, 2 for a DstackError, 1 for anything else). The child closes its copies of `let_go` (sockets
    or descriptors of others). Fork while this process has only its main thread: a lock another
    thread held would stay held in the child."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Child(name, pid)
    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        for item in let_go:
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()
        run()
        code = 0
    except SystemExit as exc:  # gunicorn stops so
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except DstackError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        code = 2
    except BaseException:  # pylint: disable=broad-exception-caught
        import traceback  # pylint: disable=import-outside-toplevel
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access  # never the parent's atexit or finally


# How long the socket API's child gets to listen. Its start is Python importing Flask, gunicorn and
# cryptography: a second on a TDX host, but over 60 s in a VM under TCG emulation on a busy host
# (seen in the suite's libvirt test). A child that fails is seen at once (its end of the pipe closes).
API_READY_TIMEOUT = 300


def _wait_ready(ready, child, timeout=API_READY_TIMEOUT):
    """Wait for the socket API's child to say it listens (one byte on the `ready` pipe)."""
    import select  # pylint: disable=import-outside-toplevel
    if not select.select([ready], [], [], timeout)[0]:
        raise DstackError("serve", f"the socket API did not listen within {timeout} s")
    if not os.read(ready, 1):
        raise DstackError("serve", f"the socket API exited (code {child.wait(5)}) before listening")


class _NamespacePorts:
    """With --netns: the Worker's listening socket in the namespace (eth0 refused on its port, unless
    the VM's port map forwards it), made before the APIs are forked, and a forwarder per port mapping,
    started once they are (its thread must not be copied into them); both before the boot."""

    def __init__(self, netns, ports, worker_port):
        from ansible_collections.dstack.tee.agents.guest import netns_ports  # pylint: disable=import-outside-toplevel
        self.worker_socket = None
        self.forwarders = []
        try:
            self.targets = [(netns_ports.parse_host_port(host), vm_port) for vm_port, host in ports.items()]
            if worker_port not in ports:
                netns_ports.guard_port(netns, worker_port)
            self.worker_socket = netns_ports.listen_in_netns(netns, "0.0.0.0", worker_port, field="--worker-port")
            self.cvm_ip = netns_ports.cvm_address(netns) if self.targets else ""
        except BaseException:
            self.close()
            raise

    def forward(self):
        """Start the forwarders (listening, with a thread each: after the children are forked)."""
        from ansible_collections.dstack.tee.agents.guest import netns_ports  # pylint: disable=import-outside-toplevel
        for listen, vm_port in self.targets:
            self.forwarders.append(netns_ports.PortForwarder(listen, (self.cvm_ip, vm_port)).start())

    def handed_over(self):
        """The Worker's child holds its socket now: this process lets go of it (so it stops with the child)."""
        self.worker_socket.close()

    def close(self):
        if self.worker_socket is not None:
            self.worker_socket.close()
        for forwarder in self.forwarders:
            forwarder.close()


class _VmWorkerPort:
    """With --own-network: the Worker's listening socket on the VM's own network (0.0.0.0:worker port),
    as dstack's guest serves its agent port: the gateway reaches it through the WireGuard tunnel
    (https://<app-id>-8090.<base_domain>); from outside the VM only the VMM's port map reaches in."""

    forwarders = ()

    def __init__(self, worker_port):
        import socket  # pylint: disable=import-outside-toplevel
        try:
            self.worker_socket = socket.create_server(("0.0.0.0", worker_port), backlog=128)
        except OSError as exc:
            raise DstackError("--worker-port", f"cannot listen on 0.0.0.0:{worker_port}: {exc.strerror or exc}") from None

    def forward(self):
        pass

    def handed_over(self):
        self.worker_socket.close()

    def close(self):
        self.worker_socket.close()


def _wait_any(children):
    """The first child to exit: (name, exit code). Blocks on their pidfds (a signal's handler runs
    meanwhile: SIGTERM's terminates them, which ends the wait)."""
    import select  # pylint: disable=import-outside-toplevel
    while True:
        for child in children.values():
            if child.poll() is not None:
                return child.name, child.returncode
        select.select([child.pidfd for child in children.values()], [], [])


def _serve_child(args, ready_w, ready_r):
    """The socket API, in a child: it tells `run` on the `ready` pipe once it listens."""
    def ready(paths):
        _say(f"{ctx.attestation_mode}: serving on {', '.join(paths)}")
        os.write(ready_w, b".")
        os.close(ready_w)  # before gunicorn forks its worker: a dead server is an EOF for `run`

    def run():
        nonlocal ctx
        os.close(ready_r)
        ctx = open_context(args)
        _serve(ctx, args, ready)

    ctx = None
    return run


def _worker_child(args, worker_socket):
    """The Worker API, in a child, on the socket `run` bound in the namespace."""
    from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner  # pylint: disable=import-outside-toplevel

    def run():
        fd = worker_socket.detach()  # gunicorn's now: no object here may close it
        ctx = open_context(args)

        def runner():  # made per request: the instance id (the default project) exists once booted
            return ComposeRunner(compose_project(args, ctx), ctx.paths.work_dir, engine=args.engine, netns=args.netns)

        worker.serve(worker.create_worker_app(ctx, runner=runner), fd, threads=worker.DEFAULT_THREADS,
                     on_ready=lambda: _say(f"{ctx.attestation_mode}: Worker API serving "
                                           f"{'in ' + args.netns if args.netns else 'on the VM network'}"))
    return run


def cmd_run(args):
    """Serve the socket API (and with --netns the Worker API), boot the app, keep it running until
    SIGTERM; then stop its containers.

    The APIs are children forked from this process, started at once: the boot runs beside their
    start and waits for the socket API only before the containers (which mount its socket)."""
    ports = _port_map(args.port)
    if args.netns and args.own_network:
        raise DstackError("--own-network", "is a VM's network; it cannot go with --netns (a namespace on the host)")
    if args.netns:
        from ansible_collections.dstack.tee.plugins.module_utils import wireguard  # pylint: disable=import-outside-toplevel
        if not wireguard.netns_exists(args.netns):
            raise DstackError("--netns", f"no network namespace {args.netns} (/run/netns/{args.netns})")
    ctx = GuestContext.open(args.config_dir, args.work_dir, tee=args.tee, sim_state_dir=args.sim_state)
    sys_config = ctx.sys_config()
    kms_url = args.kms_url or (sys_config.get("kms_urls") or [""])[0]
    kms_ca_cert = args.kms_ca_cert
    if kms_url and not kms_ca_cert and sys_config.get("kms_ca_cert"):
        kms_ca_cert = ctx.paths.work("kms-ca.crt")
        atomic_write(kms_ca_cert, sys_config["kms_ca_cert"].encode(), mode=0o644)
    child_args = argparse.Namespace(**{**vars(args), "kms_url": kms_url, "kms_ca_cert": kms_ca_cert})
    # The children import Flask and gunicorn themselves, once forked: beside the boot, on the other
    # core, instead of before its first step (the socket API is awaited only before the containers).
    # With a namespace, the CVM's ports are made before the boot: a port in use fails the start.
    if args.netns:
        netns_ports = _NamespacePorts(args.netns, ports, args.worker_port)
    elif args.own_network:   # a VM: the Worker API on its own network, as with a namespace
        netns_ports = _VmWorkerPort(args.worker_port)
    else:
        netns_ports = None
    children = {}
    ready_r, ready_w = os.pipe()
    try:
        worker_socket = [netns_ports.worker_socket] if netns_ports else []
        children["serve"] = _fork("serve", _serve_child(child_args, ready_w, ready_r), let_go=worker_socket)
        if netns_ports:
            children["worker"] = _fork("worker", _worker_child(child_args, netns_ports.worker_socket),
                                       let_go=(ready_r, ready_w, children["serve"].pidfd))
            netns_ports.handed_over()
            netns_ports.forward()
    except BaseException:
        _stop(children)
        if netns_ports:
            netns_ports.close()
        raise
    finally:
        os.close(ready_w)
    runner = boot = following = None
    stopping = {"now": False}
    agent = os.getpid()

    def stop(signum, frame):  # pylint: disable=unused-argument
        # Only flag and pass the signal on: the main flow (waiting on the children) takes the
        # containers down once they have exited.
        if os.getpid() != agent:  # a process forked from this one (pyroute2's netns helpers): the default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stopping["now"] = True
        _say(f"stopping (signal {signum}): the APIs off, then the containers")
        for child in children.values():
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        from ansible_collections.dstack.tee.agents.guest.boot import Boot  # pylint: disable=import-outside-toplevel
        from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner  # pylint: disable=import-outside-toplevel
        from ansible_collections.dstack.tee.agents.guest import container_logs  # pylint: disable=import-outside-toplevel
        project = compose_project(args, ctx)
        runner = ComposeRunner(project, ctx.paths.work_dir, engine=args.engine, netns=args.netns)
        boot = Boot(ctx, runner=runner, sockets={"dstack": os.path.abspath(args.socket),
                                                 "tappd": os.path.abspath(args.tappd_socket) if args.tappd_socket else ""},
                    port_map=ports or None, netns=args.netns, own_network=args.own_network,
                    before_containers=lambda: _wait_ready(ready_r, children["serve"]))
        boot.run()
        _say(f"booted: app_id {boot.app_id}, instance_id {boot.instance_id}, compose_hash {boot.compose_hash}")
        # The containers' output on this console (stdout), `web-1  | line`: the VMM's /logs shows it.
        if args.engine != "none":
            following = container_logs.start_following(runner, sys.stdout.buffer)
    except DstackError:
        if boot is not None:
            boot.close()
        _stop(children)
        if netns_ports:
            netns_ports.close()
        if stopping["now"]:
            return None
        raise
    finally:
        os.close(ready_r)
    name, code = _wait_any(children)
    _stop(children)
    runner.down()
    if following is not None:  # after down: the containers' last lines too
        following.stop()
    boot.close()
    if netns_ports:
        netns_ports.close()
    if stopping["now"]:
        _say("stopped")
        return None
    raise DstackError(name, f"the {'Worker' if name == 'worker' else 'socket'} API exited with code {code}")


# How long the APIs get to stop after SIGTERM (gunicorn's own graceful timeout is 5 s) before SIGKILL.
STOP_GRACE = 8


def _stop(children, grace=STOP_GRACE):
    """SIGTERM to the children, again each second while they run (a gunicorn arbiter was seen sitting
    in its signal wait with the first one unhandled; a second one let it stop: it is harmless once
    it stops), SIGKILL after `grace` seconds. A stop is bounded: nothing here is worth a hung CVM."""
    import select  # pylint: disable=import-outside-toplevel
    deadline = time.monotonic() + grace
    while True:
        running = [child for child in children.values() if child.poll() is None]
        if not running:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for child in running:
            child.terminate()
        select.select([child.pidfd for child in running], [], [], min(1.0, remaining))
    for child in running:
        _say(f"the {child.name} API did not stop within {grace} s of SIGTERM: SIGKILL")
        child.kill()
        child.wait()


# ---- the command --------------------------------------------------------------------------------

# (name, help, add_arguments, run). The boot subcommand is added here.
COMMANDS = [
    ("serve", "serve the socket API (DstackGuest and Tappd) of this CVM", add_serve_arguments, cmd_serve),
    ("simulate", "run a simulated CVM with the socket API, for app development", add_simulate_arguments, cmd_simulate),
    ("serve-worker", "serve the public Worker API on an inherited listening socket (run --netns starts it)",
     add_serve_worker_arguments, cmd_serve_worker),
    ("run", "a CVM's main process: serve the socket API, boot the app, keep it running", add_run_arguments, cmd_run),
]


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="The dstack.tee guest agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(cmd)
        cmd.set_defaults(func=run)
    return parser


def main(argv=None):
    return run_cli(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
