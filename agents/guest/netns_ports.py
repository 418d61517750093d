# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ports of a CVM that has its own network namespace (`dstack-guest-agent run --netns NAME`).

The agent process stays in the host's namespace; what the CVM serves lives in NAME:

- listen_in_netns: a listening TCP socket made inside NAME by a short thread that enters it
  (setns(2) with CLONE_NEWNET changes the calling thread only) and ends; the socket stays in NAME
  (the Worker API's port, served by a gunicorn child given the descriptor).
- guard_port: an iptables rule in NAME refusing a port on eth0, the veth to the host (made by the
  VMM's process backend). A socket bound to 0.0.0.0 in NAME answers on every address of NAME,
  eth0's too, which the host routes to: the rule keeps the Worker to the tunnel and to NAME itself.
- PortForwarder: the VM's port map with a namespace. `--port VM_PORT=HOST_ADDR:HOST_PORT` is a TCP
  listener on HOST_ADDR:HOST_PORT in the host's namespace relaying each connection to port VM_PORT
  of the CVM's eth0 address (cvm_address), as a VM's port forward reaches the guest's NIC. One
  thread per direction; an EOF is passed on as a half-close (shutdown SHUT_WR), an error closes both.
"""

import errno
import ipaddress
import logging
import socket
import subprocess
import threading

from ansible_collections.dstack.tee.plugins.module_utils import system_path
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.wireguard import check_netns_name, enter_netns, netns_exec_argv

CVM_LINK = "eth0"  # the CVM's veth to the host (agents/vmm/backends/process.py)
MAX_CONNECTIONS = 256  # per forwarded port: beyond it a new connection is closed at once
CONNECT_TIMEOUT = 10
CHUNK = 64 * 1024
log = logging.getLogger("dstack.guest.ports")


def listen_in_netns(netns, host, port, field="port", backlog=128):
    """A TCP socket listening on host:port inside network namespace `netns` (this process's other
    threads stay where they are). DstackError naming `field` when it cannot listen."""
    made = {}

    def enter_and_listen():
        try:
            enter_netns(netns)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(backlog)
            except OSError:
                sock.close()
                raise
            made["sock"] = sock
        except OSError as exc:
            made["error"] = exc

    # A fresh thread that ends here: its namespace goes with it.
    thread = threading.Thread(target=enter_and_listen, name=f"listen-in-{netns}")
    thread.start()
    thread.join()
    if "error" in made:
        exc = made["error"]
        raise DstackError(field, f"cannot listen on {host}:{port} in network namespace {netns}: "
                                 f"{exc.strerror or exc}")
    return made["sock"]


def _run(argv, what, stdin=None):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, input=stdin)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DstackError("--netns", f"{what}: {exc}") from None


def cvm_address(netns):
    """The IPv4 address of the CVM's eth0 in `netns` (the address the host reaches it on)."""
    done = _run(["ip", "-n", check_netns_name(netns), "-4", "-o", "addr", "show", "dev", CVM_LINK],
                f"cannot read {CVM_LINK}'s address in {netns}")
    for line in done.stdout.splitlines():
        words = line.split()
        if "inet" in words[:-1]:
            return str(ipaddress.ip_interface(words[words.index("inet") + 1]).ip)
    raise DstackError("--netns", f"network namespace {netns} has no IPv4 address on {CVM_LINK} "
                                 f"({(done.stderr or 'no address').strip()[:200]})")


def guard_port(netns, port):
    """Refuse TCP `port` arriving on the CVM's eth0 in `netns` (made once: an existing rule is kept)."""
    rule = ["INPUT", "-i", CVM_LINK, "-p", "tcp", "--dport", str(int(port)), "-j", "REJECT", "--reject-with", "tcp-reset"]
    if _run(netns_exec_argv(netns, [system_path.which("iptables"), "-w", "-C", *rule]), "iptables").returncode == 0:
        return
    done = _run(netns_exec_argv(netns, [system_path.which("iptables"), "-w", "-I", *rule]), "iptables")
    if done.returncode != 0:
        raise DstackError("--netns", f"cannot keep port {port} from {CVM_LINK} in {netns} (iptables: "
                                     f"{(done.stderr or done.stdout).strip()[:200]})")


WG_CHAIN = "DSTACK_WG"  # dstack's chain name


def guard_wireguard_port(netns, port, sources):
    """Accept UDP `port` (the CVM's WireGuard) in `netns` only from the gateways' addresses
    `sources`, as dstack's chain DSTACK_WG does; made again with every registration's answer."""
    # One iptables-restore for the chain (with --noflush a declared chain is made or emptied, and
    # nothing else is touched), after one check of the jump: two processes instead of six, each an
    # `ip netns exec` and an nft transaction (0.2-0.3 s of every boot that registers with a gateway).
    rules = [f":{WG_CHAIN} - [0:0]"]
    rules += [f"-A {WG_CHAIN} -s {ipaddress.ip_address(source)} -j ACCEPT" for source in sources]
    rules += [f"-A {WG_CHAIN} -j DROP"]
    jump = ["INPUT", "-p", "udp", "--dport", str(int(port)), "-j", WG_CHAIN]
    if _run(netns_exec_argv(netns, [system_path.which("iptables"), "-w", "-C", *jump]), "iptables").returncode != 0:
        rules.append(" ".join(["-I", *jump]))
    done = _run(netns_exec_argv(netns, [system_path.which("iptables-restore"), "-w", "--noflush"]), "iptables-restore",
                stdin="\n".join(["*filter", *rules, "COMMIT", ""]))
    if done.returncode != 0:
        raise DstackError("netns", f"cannot keep the WireGuard port {port} to the gateways in {netns} "
                                   f"(iptables-restore: {(done.stderr or done.stdout).strip()[:200]})")


def parse_host_port(text, field="--port"):
    """'HOST_ADDR:HOST_PORT' -> (address, port); an IPv6 address goes in brackets."""
    host, sep, port = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DstackError(field, f"{text!r} is not HOST_ADDR:HOST_PORT (a port 1-65535)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise DstackError(field, f"{host!r} is not an IP address") from None
    return host, int(port)


def _pump(source, sink):
    """Copy source -> sink until EOF (passed on as a half-close) or an error (both closed)."""
    try:
        while True:
            data = source.recv(CHUNK)
            if not data:
                break
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class PortForwarder:
    """TCP from `listen` (host, port) in this namespace to `target` (host, port); start() and close()."""

    def __init__(self, listen, target, field="--port", max_connections=MAX_CONNECTIONS):
        self.listen = listen
        self.target = target
        self.field = field
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._open = set()
        self._listener = None
        self._thread = None

    def start(self):
        family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(self.listen)
            listener.listen(128)
        except OSError as exc:
            listener.close()
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise DstackError(self.field, f"cannot listen on {self.listen[0]}:{self.listen[1]}: {why}") from None
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name=f"forward-{self.listen[1]}", daemon=True)
        self._thread.start()
        return self

    def _accept(self):
        while True:
            try:
                client, _peer = self._listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                client.close()
                continue
            threading.Thread(target=self._relay, args=(client,), name=f"forward-{self.listen[1]}-conn",
                             daemon=True).start()

    def _relay(self, client):
        upstream = None
        try:
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                log.warning("port %s: cannot reach the CVM at %s:%s: %s", self.listen[1], *self.target, exc)
                return
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()
        finally:
            with self._lock:
                self._open.difference_update((client, upstream))
            for sock in (client, upstream):
                if sock is not None:
                    sock.close()
            self._slots.release()

    def close(self):
        """Stop listening and cut every relayed connection."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone may not)
            except OSError:
                pass
            self._listener.close()
            self._thread.join(5)
            self._listener = None
        with self._lock:
            live = list(self._open)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
