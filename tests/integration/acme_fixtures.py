"""A real ACME server and a real DNS server for the tests: Pebble (Debian's, the Let's Encrypt test
server) validating DNS-01 against BIND9 (dns_fixtures.Bind: `named -g`, a zone open to RFC 2136
updates signed by its TSIG key). Every port is a free loopback port; everything lives in one temp
folder and stops with the fixture.

Use in a test module (module scope: one BIND and one Pebble per module, about 1 s to start):

    from acme_fixtures import acme_world  # noqa: F401  (the fixture)

    def test_x(acme_world):
        acme_world.credentials(path)       # certbot-dns-rfc2136's INI for the BIND (0600): the path
        acme_world.pebble.directory        # https://127.0.0.1:PORT/dir ([core.certbot] acme_url)
        acme_world.pebble.ca_bundle        # the CA of Pebble's HTTPS listener ([core.certbot] acme_ca_bundle)
        acme_world.pebble.issuing_roots()  # the roots Pebble issues under (a client's trust)
        acme_world.dns.dig("dstack.test", "CAA"), acme_world.dns.update(...)   # dns_fixtures.Bind

Or start them yourself: start_acme_world(folder) / stop_acme_world(world), or start_dns(folder) and
PebbleServer(folder, dns.address).start(). Pebble's files and certbot's credentials are written
as the demo's (module_utils/acme_lab.py, dstack.tee.acme_lab).
"""

import dataclasses
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port
from dns_fixtures import NAMED, TSIG_NAME, Bind
from ansible_collections.dstack.tee.plugins.module_utils import acme_lab

ZONE = "dstack.test"
START_TIMEOUT = 30.0

needs_acme_world = pytest.mark.skipif(
    not (os.path.exists(NAMED) and shutil.which("nsupdate") and shutil.which("dig") and shutil.which("pebble")),
    reason="pebble, bind9 and bind9-dnsutils are installed by scripts/setup.sh")


def _wait(check, what, proc, log_path, timeout=START_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{Path(log_path).read_text(errors='replace')}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start in {timeout:.0f} s:\n{Path(log_path).read_text(errors='replace')}")


def _stop(proc):
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- BIND9 (dns_fixtures.Bind) and certbot-dns-rfc2136's credentials for it --------------------------

def start_dns(folder, zone=ZONE):
    """dns_fixtures.Bind authoritative for `zone`, every name under it A 127.0.0.1, updates allowed
    to its TSIG key anywhere in the zone."""
    return Bind(folder, {zone: ["@ IN A 127.0.0.1", "* IN A 127.0.0.1"]}).start()


def rfc2136_credentials(dns, path, secret=None, mode=0o600):
    """certbot-dns-rfc2136's credentials INI for `dns` (the gateway's [core.certbot] credentials);
    `secret` replaces the key's (a wrong one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(acme_lab.rfc2136_credentials(dns.ip, dns.port, TSIG_NAME, dns.secret if secret is None else secret))
    os.chmod(path, mode)
    return str(path)


# ---- Pebble ---------------------------------------------------------------------------------------

def _https_cert(folder):
    """A CA and a certificate for 127.0.0.1 / localhost: Pebble's HTTPS listener (not its issuing CA)."""
    ca_pem, cert_pem, key_pem = acme_lab.listener_tls(("localhost", "127.0.0.1"), days=2)
    (folder / "listener-ca.pem").write_text(ca_pem)
    (folder / "listener.pem").write_text(cert_pem)
    (folder / "listener.key").write_text(key_pem)


class PebbleServer:
    """pebble on 127.0.0.1 (ACME directory at .directory), resolving DNS-01 names at dns_address;
    every order validated for real (no authorization reuse)."""

    def __init__(self, folder, dns_address):
        self.folder = Path(folder)
        self.dns_address = dns_address
        self.port = self.management_port = None
        self.proc = None
        self.log = self.folder / "pebble.log"

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        _https_cert(self.folder)
        self.port, self.management_port = free_port(), free_port()
        # No HTTP-01 or TLS-ALPN-01 here: ports nothing listens on.
        (self.folder / "pebble.json").write_text(acme_lab.pebble_config(
            f"127.0.0.1:{self.port}", f"127.0.0.1:{self.management_port}", str(self.folder / "listener.pem"),
            str(self.folder / "listener.key"), http_port=free_port(), tls_port=free_port()))
        env = dict(os.environ, **acme_lab.PEBBLE_ENV)
        with open(self.log, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [shutil.which("pebble"), "-config", str(self.folder / "pebble.json"), "-dnsserver", self.dns_address],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait(self._answers, "pebble", self.proc, self.log)
        return self

    def _context(self):
        return ssl.create_default_context(cafile=self.ca_bundle)

    def _answers(self):
        try:
            with urllib.request.urlopen(self.directory, context=self._context(), timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self):
        _stop(self.proc)

    @property
    def directory(self):
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def ca_bundle(self):
        return str(self.folder / "listener-ca.pem")

    def issuing_roots(self):
        """The PEM roots Pebble issues under (made anew at each start), from its management API."""
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management_port}/roots/0",
                                    context=self._context(), timeout=5) as answer:
            return answer.read().decode()


@dataclasses.dataclass
class AcmeWorld:
    dns: Bind
    pebble: PebbleServer
    folder: Path

    def credentials(self, path, secret=None, mode=0o600):
        return rfc2136_credentials(self.dns, path, secret, mode)


def start_acme_world(folder, zone=ZONE):
    """BIND9 for `zone` and Pebble resolving through it, in `folder`; stop with stop_acme_world."""
    folder = Path(folder)
    dns = start_dns(folder, zone)
    try:
        pebble = PebbleServer(folder / "pebble", dns.address).start()
    except Exception:
        dns.stop()
        raise
    return AcmeWorld(dns, pebble, folder)


def stop_acme_world(world):
    world.pebble.stop()
    world.dns.stop()


@pytest.fixture(scope="module")
def acme_world():
    """A BIND9 and a Pebble for this test module (see the module's documentation)."""
    if needs_acme_world.args[0]:
        pytest.skip(needs_acme_world.kwargs["reason"])
    folder = Path(tempfile.mkdtemp(prefix="acme-", dir="/tmp"))
    world = start_acme_world(folder)
    try:
        yield world
    finally:
        stop_acme_world(world)
        shutil.rmtree(folder, ignore_errors=True)
