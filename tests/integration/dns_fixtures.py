"""A real DNS server for the tests: BIND9's `named -g` on a free port, its zones in a temporary
folder, records changed by RFC 2136 dynamic updates signed with a TSIG key (nsupdate), read back
with dig (machine-recipes.md, "A real DNS server with dynamic updates"). Its files are written as
the demo's (module_utils/acme_lab.py, dstack.tee.acme_lab), with the query log on.

    with Bind(tmp_path, {"example.test": ['_dstack-app-address.app 60 TXT "abc:443"']}) as dns:
        dns.address                  # "127.0.0.1:PORT" (core.proxy.dns_resolver)
        dns.update('add x.example.test 60 TXT "v"', 'delete y.example.test TXT')
        dns.dig("x.example.test", "TXT")   # ['"v"']
        dns.queries("x.example.test")      # how many queries for that name reached the server

netns: run named (and nsupdate, dig) inside that network namespace, listening on its loopback.
Each zone's negative TTL (SOA minimum, and the SOA's own TTL) is `negative_ttl` (an hour by
default: longer than any cache bound a test checks).
"""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import acme_lab, wireguard

NAMED = shutil.which("named") or "/usr/sbin/named"
needs_bind = pytest.mark.skipif(not (os.path.exists(NAMED) and shutil.which("nsupdate") and shutil.which("dig")),
                                reason="BIND9 is not installed (apt-get install bind9 bind9-dnsutils)")
TSIG_NAME = "dstack-test-key"


def free_port(address="127.0.0.1"):
    """A port free for both TCP and UDP on `address` (named needs both)."""
    for _attempt in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((address, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((address, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port free for both TCP and UDP")


class Bind:
    """One named process; see the module's documentation."""

    def __init__(self, folder, zones, address="127.0.0.1", port=None, netns=None, negative_ttl=3600):
        self.folder = Path(folder) / "bind"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.zones, self.ip, self.netns, self.negative_ttl = zones, address, netns, negative_ttl
        self.port = port or free_port("127.0.0.1" if netns else address)
        self.secret = acme_lab.new_tsig_secret()
        self.proc = None
        self.log_path = self.folder / "named.log"

    @property
    def address(self):
        return f"{self.ip}:{self.port}"

    @property
    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _argv(self, argv):
        return wireguard.netns_exec_argv(self.netns, argv) if self.netns else argv

    def _write(self):
        key = self.folder / "tsig.key"
        key.write_text(acme_lab.tsig_key(TSIG_NAME, self.secret))
        key.chmod(0o600)
        zone_files = {}
        for zone, records in self.zones.items():
            zone_files[zone] = self.folder / f"{zone}.zone"
            zone_files[zone].write_text(acme_lab.zone_file(zone, records, self.negative_ttl))
        (self.folder / "named.conf").write_text(
            acme_lab.named_conf(self.folder, key, TSIG_NAME, zone_files, self.ip, self.port, query_log=True))

    def start(self, timeout=20):
        self._write()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                self._argv([NAMED, "-g", "-c", str(self.folder / "named.conf")]), stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while "running" not in self.log:
            if self.proc.poll() is not None:
                raise RuntimeError(f"named exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"named did not start in {timeout} s:\n{self.log[-3000:]}")
            time.sleep(0.05)
        # "running" comes a moment before the zones answer (the first queries can get SERVFAIL).
        for zone in self.zones:
            while not self.dig(zone, "SOA"):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"named does not answer for {zone}:\n{self.log[-3000:]}")
                time.sleep(0.05)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def update(self, *commands):
        """RFC 2136 updates ("add NAME TTL TYPE DATA", "delete NAME [TYPE]"), signed with the TSIG
        key, sent with nsupdate; raises with nsupdate's output when the server refuses them."""
        script = f"server {self.ip} {self.port}\n" + "".join(f"update {c}\n" for c in commands) + "send\n"
        done = subprocess.run(self._argv(["nsupdate", "-k", str(self.folder / "tsig.key")]), input=script,
                              capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"nsupdate failed ({done.returncode}): {done.stdout}{done.stderr}")

    def dig(self, name, rdtype="TXT"):
        done = subprocess.run(self._argv(["dig", "+short", "+time=2", "+tries=1", f"@{self.ip}", "-p", str(self.port),
                                          rdtype, name]), capture_output=True, text=True, timeout=30, check=False)
        return done.stdout.split("\n")[:-1]

    def queries(self, name, rdtype="TXT"):
        """How many queries for NAME/TYPE named has logged (querylog)."""
        pattern = re.compile(rf"query: {re.escape(name)} IN {rdtype} ", re.IGNORECASE)
        return len(pattern.findall(self.log))
