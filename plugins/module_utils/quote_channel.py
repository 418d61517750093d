# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The simulated TEE of a real VM: a quote service on the host, reached over a virtio-serial port.

A VM the libvirt backend boots without TDX (no_tee) has no TDX module to sign its quotes. On real
TDX the guest's quote request leaves the VM for the host's Quote Generation Service (QGS); here it
does the same over a virtio-serial port named `org.dstack.quote` (a unix socket on the host, the
domain's `<channel>`; vsock would do as well, but needs the host's vhost_vsock module). The host
side holds the simulated platform's keys (tdx_sim.SimTdx) and puts into each quote what a TDX
module would: MRTD and RTMR0-2 measured at launch from the vm_config the VMM gave the VM
(tdx_sim.launch_measurements: the OS image), never values the guest sends. The guest keeps its
own RTMR3 (extended by its boot, in a file on its tmpfs, so a reboot starts from zero) and sends
it with the report_data, as the TD report carries RTMR3 on real TDX.

The wire: one JSON object per line each way, at most MAX_LINE bytes:
    guest -> host  {"id": "<hex>", "op": "launch"}
                   {"id": "<hex>", "op": "quote", "report_data": "<128 hex>", "rtmr3": "<96 hex>"}
                   {"id": "<hex>", "op": "platform"}
    host -> guest  {"id": "<same>", "mr_td": ..., "rtmr0": ..., "rtmr1": ..., "rtmr2": ...}
                   {"id": "<same>", "quote": "<hex>"}
                   {"id": "<same>", "root_ca": "<DER hex>", "collateral": {QuoteCollateralV3 JSON}}
                   {"id": "<same>", "error": "<reason>"}
`platform` is the simulated platform's public trust (its root CA and collateral): what the guest
verifies other CVMs' quotes under (the gateway's RA-TLS), as the gateway and the KMS on the host do.
The guest takes it from its host, which signs its own quotes anyway: a no_tee VM trusts its host.
A guest skips lines with another id (an answer to a request a restarted agent gave up on).
"""

import errno
import fcntl
import json
import os
import select
import socket
import threading
import time

from ansible_collections.dstack.tee.plugins.module_utils import eventlog
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.eventlog import RTMR_SIZE, check_rtmr_args
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, locked, read_bytes
from ansible_collections.dstack.tee.plugins.module_utils.tdx_quote import pad_report_data

PORT_NAME = "org.dstack.quote"
VIRTIO_PORTS_DIR = "/sys/class/virtio-ports"
DEFAULT_RTMR_STATE = "/run/dstack/rtmrs.json"
MAX_LINE = 64 * 1024           # a quote is about 5 KiB as hex; the requests are far smaller
GUEST_TIMEOUT = 30.0           # the host signs in milliseconds; TCG guests are slow
LAUNCH_FIELDS = ("mr_td", "rtmr0", "rtmr1", "rtmr2")


def find_port(ports_dir=VIRTIO_PORTS_DIR, dev_dir="/dev"):
    """The device of the virtio-serial port named PORT_NAME (its /sys name file), or None.
    Read from sysfs, so no udev is needed for /dev/virtio-ports/ links."""
    try:
        names = sorted(os.listdir(ports_dir))
    except OSError:
        return None
    for port in names:
        try:
            with open(os.path.join(ports_dir, port, "name"), encoding="ascii", errors="replace") as handle:
                if handle.read().strip() == PORT_NAME:
                    return os.path.join(dev_dir, port)
        except OSError:
            continue
    return None


# ---- the guest side -------------------------------------------------------------------------------

class ChannelQuoteProvider:
    """The guest's TEE provider in a no_tee VM: quotes from the host over the virtio-serial port,
    RTMRs kept here (RTMR0-2 as the host measured them at launch, RTMR3 extended by this boot)."""

    attestation_mode = "dstack-sim"

    def __init__(self, device, rtmr_state=DEFAULT_RTMR_STATE, timeout=GUEST_TIMEOUT):
        self.device = device
        self.rtmr_state = rtmr_state
        self.timeout = timeout

    # One request at a time on the port, across the agent's processes (a lock file beside the state).
    def _lock_path(self):
        return self.rtmr_state + ".lock"

    def _ask(self, request):
        request = dict(request, id=os.urandom(8).hex())
        line = (json.dumps(request, sort_keys=True) + "\n").encode()
        deadline = time.monotonic() + self.timeout
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise DstackError("quote_channel", f"cannot open {self.device}: {exc.strerror}") from None
        try:
            _write_all(fd, line, deadline, self)
            buf = b""
            while True:
                while b"\n" not in buf:
                    buf += _read_some(fd, deadline, self)
                    if len(buf) > MAX_LINE:
                        raise DstackError("quote_channel", f"the host sent a line over {MAX_LINE} bytes")
                raw, buf = buf.split(b"\n", 1)
                try:
                    answer = json.loads(raw)
                except ValueError:
                    continue  # a line cut by an earlier reader: not ours
                if isinstance(answer, dict) and answer.get("id") == request["id"]:
                    break
        finally:
            os.close(fd)
        if answer.get("error"):
            raise DstackError("quote_channel", f"the host's quote service refused: {str(answer['error'])[:200]}")
        return answer

    def _state(self):
        """{"mr_td", "rtmr0".."rtmr3"}: from the state file, else the host's launch values and a zero
        RTMR3 (the first read of this boot; the caller holds the lock)."""
        if os.path.exists(self.rtmr_state):
            try:
                data = json.loads(read_bytes(self.rtmr_state, "rtmr_state"))
                return {name: parse_hex(data[name], name, RTMR_SIZE) for name in LAUNCH_FIELDS + ("rtmr3",)}
            except (ValueError, KeyError, TypeError, DstackError) as exc:
                raise DstackError("rtmr_state", f"{self.rtmr_state} is damaged ({exc}); it is not reset") from None
        answer = self._ask({"op": "launch"})
        try:
            state = {name: parse_hex(answer.get(name, ""), name, RTMR_SIZE) for name in LAUNCH_FIELDS}
        except DstackError as exc:
            raise DstackError("quote_channel", f"the host's launch answer is malformed: {exc}") from None
        state["rtmr3"] = bytes(RTMR_SIZE)
        self._write(state)
        return state

    def _write(self, state):  # under _locked, which made the folder
        atomic_write(self.rtmr_state, (json.dumps({k: v.hex() for k, v in sorted(state.items())}) + "\n").encode(), 0o600)

    def _locked(self, mode):
        os.makedirs(os.path.dirname(self.rtmr_state) or ".", exist_ok=True)
        return locked(self._lock_path(), mode)

    def read_rtmrs(self):
        with self._locked(fcntl.LOCK_EX):
            state = self._state()
        return [state[f"rtmr{i}"] for i in range(4)]

    def extend_rtmr(self, index, digest):
        check_rtmr_args(index, digest)
        if index != eventlog.RTMR3:
            # RTMR0-2 are the firmware's and the host measured them at launch.
            raise DstackError("rtmr", f"RTMR{index} is measured at launch; only RTMR3 can be extended")
        with self._locked(fcntl.LOCK_EX):
            state = self._state()
            state["rtmr3"] = eventlog.extend(state["rtmr3"], bytes(digest))
            self._write(state)

    def platform_trust(self):
        """(root CA DER, collateral JSON text) of the host's simulated platform (the `platform` op)."""
        with self._locked(fcntl.LOCK_EX):
            answer = self._ask({"op": "platform"})
        try:
            root_ca = bytes.fromhex(str(answer.get("root_ca", "")))
        except ValueError:
            root_ca = b""
        collateral = answer.get("collateral")
        if not root_ca or not isinstance(collateral, dict):
            raise DstackError("quote_channel", "the host's platform answer has no root_ca and collateral")
        return root_ca, json.dumps(collateral)

    def get_quote(self, report_data):
        padded = pad_report_data(report_data)
        with self._locked(fcntl.LOCK_EX):
            state = self._state()
            answer = self._ask({"op": "quote", "report_data": padded.hex(), "rtmr3": state["rtmr3"].hex()})
        try:
            quote = bytes.fromhex(str(answer.get("quote", "")))
        except ValueError:
            raise DstackError("quote_channel", "the host's quote is not hex") from None
        if not quote:
            raise DstackError("quote_channel", "the host sent an empty quote")
        return quote


def _write_all(fd, data, deadline, provider):
    while data:
        _wait(fd, select.POLLOUT, deadline, provider)
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            continue


def _read_some(fd, deadline, provider):
    while True:
        _wait(fd, select.POLLIN, deadline, provider)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if chunk:
            return chunk
        # A virtio-serial port reads 0 bytes while the host side is not connected: wait and retry.
        time.sleep(0.05)


def _wait(fd, event, deadline, provider):
    poller = select.poll()
    poller.register(fd, event)
    left = deadline - time.monotonic()
    if left <= 0 or not poller.poll(left * 1000):
        raise DstackError("quote_channel", f"no answer from the host's quote service on {provider.device} "
                                           f"within {provider.timeout:g} s (is the VMM running?)")


# ---- the host side --------------------------------------------------------------------------------

class QuoteService:
    """Answers one VM's port: `sim` signs (a tdx_sim.SimTdx), `launch` is the VM's launch
    measurements (tdx_sim.launch_measurements of the vm_config the VMM gave it)."""

    def __init__(self, sim, launch, name="vm"):
        self.sim = sim
        self.launch = {name_: bytes(launch[name_]) for name_ in LAUNCH_FIELDS}
        self.name = name

    def answer(self, raw):
        """The answer line (bytes, newline included) to one request line."""
        try:
            request = json.loads(raw)
        except ValueError:
            return None  # noise on the port (a guest's half line): nothing to answer to
        if not isinstance(request, dict):
            return None
        ident = request.get("id")
        if not isinstance(ident, str) or len(ident) > 64:
            return None
        try:
            result = self._handle(request)
        except DstackError as exc:
            result = {"error": str(exc)}
        result["id"] = ident
        return (json.dumps(result, sort_keys=True) + "\n").encode()

    def _handle(self, request):
        op = request.get("op")
        if op == "launch":
            return {name: value.hex() for name, value in self.launch.items()}
        if op == "quote":
            report_data = parse_hex(str(request.get("report_data", "")), "report_data", 64)
            rtmr3 = parse_hex(str(request.get("rtmr3", "")), "rtmr3", RTMR_SIZE)
            quote = self.sim.get_quote(report_data, rtmr3=rtmr3, **self.launch)
            return {"quote": quote.hex()}
        if op == "platform":
            return {"root_ca": self.sim.root_ca_der.hex(), "collateral": json.loads(self.sim.collateral_json())}
        raise DstackError("op", f"unknown operation {str(op)[:20]!r} (launch, quote or platform)")


class QuoteChannelServer:
    """Serves QuoteService on QEMU's end of the port: the unix socket the domain's channel binds
    (QEMU listens; this side connects, and connects again whenever the socket goes away and comes
    back: a VM restart). One thread per VM, stopped by close()."""

    def __init__(self, socket_path, service, retry=0.2):
        self.socket_path = socket_path
        self.service = service
        self.retry = retry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"quote-channel-{service.name}", daemon=True)
        self._sock = None

    def start(self):
        self._thread.start()
        return self

    def close(self, timeout=2.0):
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout)

    @property
    def alive(self):
        return self._thread.is_alive()

    def _run(self):
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                # Not there yet (the VM starting) or refused: soon again; anything else, later.
                self._stop.wait(self.retry if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
                                else self.retry * 5)
                continue
            self._sock = sock
            try:
                self._serve(sock)
            except OSError:
                pass
            finally:
                self._sock = None
                sock.close()
            self._stop.wait(self.retry)

    def _serve(self, sock):
        buf = b""
        while not self._stop.is_set():
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                reply = self.service.answer(raw)
                if reply is not None:
                    sock.sendall(reply)
            if len(buf) > MAX_LINE:
                buf = b""  # an over-long line is no request: drop it and resynchronise on the next
