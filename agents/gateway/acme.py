# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's certificates from an ACME CA by DNS-01, with certbot as the ACME client
([core.certbot] of gateway.toml), every key attested.

    manager = AcmeManager(config, store)
    manager.ensure_current()        # at start: a valid certificate in the store, ordered if none
    manager.renew(force=False)      # (renewed, reason); the schedule and Admin.RenewCert call it
    manager.set_caa()               # CAA for the domain pinned to ca_name, DNS-01 and our account
    acme_info(store)                # Gateway.AcmeInfo and /.dstack/acme-info

Keys. Each certificate key is a P-256 key the gateway makes itself, in its CVM; its public key
(SubjectPublicKeyInfo DER) is quoted by the CVM's guest agent with report_data =
SHA-512("zt-cert:" || DER) BEFORE the order (so no certificate for it can be logged in CT that the
gateway did not attest), and certbot gets only a CSR (`certonly --csr`): the key never reaches
certbot. The ACME account key is made by certbot's `register` (certbot has no way to take an
account key, and writing its account folder ourselves would need the newAccount request only an
ACME client may send); certbot runs as a child of the gateway, in the same CVM, so that key too
is made inside the TEE and never leaves it. The account URI is quoted with report_data =
SHA-512("acme-account:" || URI).
A key whose order then fails stays in the history: the attested set may hold keys no certificate
was issued for, never a certificate key that was not attested.

State, in the store's blobs (one node's SQLite, or a cluster's etcd: every node serves the same
certificate and uses the same account): ACCOUNT_BLOB {acme_url, uri, account_id, files (certbot's
account folder), quote, attestation}, CERT_BLOB {name, names, chain, key, public_key, not_after,
issued_at}, KEYS_BLOB [{name, public_key, quote, attestation, added_at}] (quoted_hist_keys: every
key ever quoted, the current one last). The quote strings are dstack's: the guest agent's GetQuote
answer as compact JSON ({quote, event_log, report_data, vm_config}; what `dstack-verify` reads),
and Attest's attestation (hex).

certbot runs as `python -m certbot`-equivalent children, each in a fresh folder under
<state_dir>/certbot (config, work and logs; the account written there from the store, the folder
removed after), so runs for different certificates never share certbot's own locks, and the last
run's log is kept as <state_dir>/certbot/last-<what>.log. The per-certificate store lock
`acme-cert/<name>` makes sure two nodes (or the schedule and Admin.RenewCert) never order the same
certificate at once; the one that waits finds the other's certificate and orders nothing.

Serving: the data plane loads the certificate from the store (ServedCertificate) and polls it
every CERT_CHECK_INTERVAL: a renewal by any node is served on new connections within seconds,
and the connections open keep their TLS session (the old context stays theirs).
"""

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.agents.gateway import dns_provider
from ansible_collections.dstack.tee.agents.gateway.proxy import server_contexts
from ansible_collections.dstack.tee.agents.gateway.store import Unavailable
from ansible_collections.dstack.tee.plugins.module_utils import guest_client
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import spki_der
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write

log = logging.getLogger("dstack.gateway.acme")

ACCOUNT_BLOB = "acme/account"
KEYS_BLOB = "acme/keys"
CERT_BLOB = "acme/cert/"          # + the certificate's name
LOCK_TTL = 60                     # seconds; pushed while held (store.lock), so a run may take longer
CERT_CHECK_INTERVAL = 2.0         # how often the data plane looks for a renewed certificate
CERTBOT_MAIN = "import sys; from certbot.main import main; sys.exit(main())"
CERTBOT_NOISE = ("Saving debug log", "Ask for help", "See the logfile", "- - -", "If you like Certbot",
                 "Donating to", "NEXT STEPS")
ACME_FIELD = "core.certbot"


def quote_report_data(tag, payload):
    """dstack's report_data of a quoted content: SHA-512(tag || ":" || payload)."""
    return hashlib.sha512(tag.encode() + b":" + bytes(payload)).digest()


def zt_cert_report_data(public_key_der):
    return quote_report_data("zt-cert", public_key_der)


def acme_account_report_data(account_uri):
    return quote_report_data("acme-account", account_uri.encode())


class Quoter:
    """Quotes from the guest agent of the gateway's own CVM (rpc.guest_agent), in dstack's strings."""

    def __init__(self, socket_path, field="rpc.guest_agent"):
        self.socket_path, self.field = socket_path, field

    def quote(self, report_data):
        """(quote, attestation): GetQuote's answer as compact JSON, Attest's attestation (hex)."""
        if not self.socket_path:
            raise DstackError(self.field, "is required: the ACME account and certificate keys are quoted by the "
                                          "gateway CVM's guest agent")
        answer = guest_client.get_quote(self.socket_path, report_data, field=self.field)
        attested = guest_client.call(self.socket_path, "Attest", {"report_data": bytes(report_data).hex()},
                                     field=self.field)
        if not isinstance(answer, dict) or "quote" not in answer or "attestation" not in attested:
            raise DstackError(self.field, "GetQuote or Attest answered without a quote or an attestation")
        return json.dumps(answer, separators=(",", ":")), attested["attestation"]


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A certificate the gateway holds: its name (the store key), DNS names, PEM chain (leaf
    first) and key, the key's SPKI (hex), its expiry and when it was issued (Unix seconds)."""
    name: str
    names: tuple
    chain: str
    key: str
    public_key: str
    not_after: float
    issued_at: float

    def to_json(self):
        return json.dumps(dict(dataclasses.asdict(self), names=list(self.names)), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data):
        doc = json.loads(data)
        return cls(**dict(doc, names=tuple(doc["names"])))

    @property
    def fingerprint(self):
        return hashlib.sha256(self.chain.encode()).hexdigest()


def certificate_names(config):
    """(name, [DNS names]) of the wildcard certificate: the domain and *.domain ([core.certbot] domain)."""
    domain = config["core"]["certbot"]["domain"] or config["core"]["proxy"]["base_domain"]
    return domain, [f"*.{domain}", domain]


def _utc(timestamp):
    return f"{datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def _json_blob(store, name, default=None):
    data = store.get_blob(name)
    return json.loads(data) if data else default


def acme_info(store):
    """Gateway.AcmeInfo and /.dstack/acme-info: {account_uri, quoted_hist_keys[{public_key, quote,
    attestation}], account_quote, account_attestation} (dstack's AcmeInfoResponse, its field order;
    public_key is the SPKI DER in hex, as dstack's pRPC JSON gives bytes)."""
    account = _json_blob(store, ACCOUNT_BLOB, {})
    keys = _json_blob(store, KEYS_BLOB, [])
    return {"account_uri": account.get("uri", ""),
            "quoted_hist_keys": [{"public_key": k["public_key"], "quote": k["quote"], "attestation": k["attestation"]}
                                 for k in keys],
            "account_quote": account.get("quote", ""),
            "account_attestation": account.get("attestation", "")}


def _csr(key, names):
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _private_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class AcmeManager:
    """The certificates of one gateway node; see the module's documentation."""

    def __init__(self, config, store, quoter=None):
        self.config = config
        self.settings = config["core"]["certbot"]
        self.store = store
        self.folder = os.path.join(config["core"]["state_dir"], "certbot")
        self.name, self.names = certificate_names(config)
        self.provider = dns_provider.open_provider(self.settings["dns_provider"], self.settings["credentials"],
                                                   ACME_FIELD)
        self.quoter = quoter or Quoter(config["rpc"]["guest_agent"])

    # ---- what the store holds -------------------------------------------------------------------

    def certificate(self, name=None):
        """The Certificate stored for `name` (default the wildcard's), or None."""
        data = self.store.get_blob(CERT_BLOB + (name or self.name))
        return Certificate.from_json(data) if data else None

    def account(self):
        """The stored account of acme_url, or None (another ACME server's does not count)."""
        account = _json_blob(self.store, ACCOUNT_BLOB)
        return account if account and account.get("acme_url") == self.settings["acme_url"] else None

    def due(self, certificate, now=None, names=None):
        """Why `certificate` must be renewed ("" when it need not be); `names`: the DNS names it
        must hold (default the wildcard's)."""
        names = list(names or self.names)
        if certificate is None:
            return "no certificate yet"
        if sorted(certificate.names) != sorted(names):
            return f"its names {', '.join(certificate.names)} are not the configured {', '.join(names)}"
        left = certificate.not_after - (time.time() if now is None else now)
        if left <= self.settings["renew_before_expiration"]:
            return f"it expires in {max(left, 0) / 86400:.1f} days"
        return ""

    # ---- certbot ---------------------------------------------------------------------------------

    def _certbot(self, args, what, account=None):
        """Run certbot in a fresh folder (the account written there first); (folder, stdout). The
        folder is the caller's to read and then remove (a context manager)."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        run = tempfile.mkdtemp(prefix="run-", dir=self.folder)
        config_dir, work_dir, logs_dir = (os.path.join(run, d) for d in ("config", "work", "logs"))
        if account is not None:
            for relative, text in account["files"].items():
                path = os.path.join(config_dir, relative)
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                atomic_write(path, text.encode(), mode=0o600)
        argv = [sys.executable, "-c", CERTBOT_MAIN, *args, "--non-interactive", "--server", self.settings["acme_url"],
                "--config-dir", config_dir, "--work-dir", work_dir, "--logs-dir", logs_dir, "--max-log-backups", "0"]
        env = dict(os.environ)
        if self.settings["acme_ca_bundle"]:
            env["REQUESTS_CA_BUNDLE"] = os.path.abspath(self.settings["acme_ca_bundle"])
        timeout = self.settings["renew_timeout"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=run,
                                  check=False)
        except subprocess.TimeoutExpired:
            shutil.rmtree(run, ignore_errors=True)
            raise DstackError(ACME_FIELD, f"certbot {what} did not finish in {timeout:.0f} s "
                                          "(core.certbot.renew_timeout)") from None
        self._keep_log(logs_dir, what)
        if done.returncode != 0:
            shutil.rmtree(run, ignore_errors=True)
            said = self.provider.redact(done.stderr + done.stdout)
            lines = [line.strip() for line in said.splitlines() if line.strip()
                     and not any(line.strip().startswith(n) or n in line for n in CERTBOT_NOISE)]
            hint = self.provider.explain(said)
            raise DstackError(ACME_FIELD, f"certbot {what} at {self.settings['acme_url']} failed: "
                                          f"{' '.join(lines[-3:])[:600] or 'no message'}"
                                          f"{'; ' + hint if hint else ''} (certbot's log: {self._log_path(what)})")
        return run, done.stdout

    def _log_path(self, what):
        return os.path.join(self.folder, f"last-{what.split()[0]}.log")

    def _keep_log(self, logs_dir, what):
        try:
            with open(os.path.join(logs_dir, "letsencrypt.log"), encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            return
        atomic_write(self._log_path(what), self.provider.redact(text).encode(), mode=0o600)

    # ---- the account -----------------------------------------------------------------------------

    def ensure_account(self):
        """The account of acme_url: the stored one, or registered now (certbot register), quoted
        and stored, under the store lock `acme-account` (one registration per cluster)."""
        account = self.account()
        if account is not None:
            return account
        with self.store.lock("acme-account", ttl=LOCK_TTL, wait=self.settings["renew_timeout"]):
            account = self.account()
            if account is not None:
                return account
            email = ["--email", self.settings["email"]] if self.settings["email"] else \
                ["--register-unsafely-without-email"]
            run, _out = self._certbot(["register", "--agree-tos", *email], "register")
            try:
                files = self._account_files(os.path.join(run, "config"))
            finally:
                shutil.rmtree(run, ignore_errors=True)
            regr = [json.loads(text) for path, text in files.items() if path.endswith("/regr.json")]
            if len(regr) != 1 or not regr[0].get("uri"):
                raise DstackError(ACME_FIELD, "certbot register left no account (no regr.json with its URI)")
            uri = regr[0]["uri"]
            account_id = next(path for path in files if path.endswith("/regr.json")).split("/")[-2]
            quote, attestation = self.quoter.quote(acme_account_report_data(uri))
            account = {"acme_url": self.settings["acme_url"], "uri": uri, "account_id": account_id, "files": files,
                       "quote": quote, "attestation": attestation, "created_at": time.time()}
            self.store.put_blob(ACCOUNT_BLOB, json.dumps(account, sort_keys=True).encode())
            log.info("ACME account %s registered at %s and quoted", uri, self.settings["acme_url"])
            return account

    @staticmethod
    def _account_files(config_dir):
        files = {}
        accounts = os.path.join(config_dir, "accounts")
        for folder, _dirs, names in os.walk(accounts):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as handle:
                    files[os.path.relpath(path, config_dir)] = handle.read()
        return files

    # ---- ordering --------------------------------------------------------------------------------

    def _quote_key(self, name, public_key_der):
        """Quote a new key and add it to the history (quoted_hist_keys), before any CA sees it."""
        quote, attestation = self.quoter.quote(zt_cert_report_data(public_key_der))
        with self.store.lock("acme-keys", ttl=LOCK_TTL, wait=LOCK_TTL):
            keys = _json_blob(self.store, KEYS_BLOB, [])
            keys.append({"name": name, "public_key": public_key_der.hex(), "quote": quote,
                         "attestation": attestation, "added_at": time.time()})
            self.store.put_blob(KEYS_BLOB, json.dumps(keys, sort_keys=True).encode())

    def _order(self, name, names):
        """A new key, quoted, and a certificate for it through certbot; stored and returned."""
        account = self.ensure_account()
        key = ec.generate_private_key(ec.SECP256R1())
        der = spki_der(key.public_key())
        self._quote_key(name, der)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="csr-", dir=self.folder) as scratch:
            csr_path = os.path.join(scratch, "csr.pem")
            atomic_write(csr_path, _csr(key, names), mode=0o600)
            out = os.path.join(scratch, "out")
            os.mkdir(out, 0o700)
            run, _stdout = self._certbot(
                ["certonly", "--csr", csr_path, "--cert-path", os.path.join(out, "cert.pem"),
                 "--chain-path", os.path.join(out, "chain.pem"), "--fullchain-path", os.path.join(out, "fullchain.pem"),
                 "--account", account["account_id"], "--agree-tos",
                 *self.provider.certbot_args(self.settings["dns_propagation_seconds"])],
                f"certonly {name}", account)
            shutil.rmtree(run, ignore_errors=True)
            with open(os.path.join(out, "fullchain.pem"), encoding="ascii") as handle:
                chain = handle.read()
        certificate = self._checked(name, names, chain, key, der)
        self.store.put_blob(CERT_BLOB + name, certificate.to_json())
        log.info("certificate for %s issued by %s in %.1f s, valid until %s (key ...%s)", ", ".join(names),
                 self.settings["acme_url"], time.monotonic() - started, _utc(certificate.not_after),
                 certificate.public_key[-16:])
        return certificate

    @staticmethod
    def _checked(name, names, chain, key, der):
        """The issued chain as a Certificate: its leaf for our key and exactly our names."""
        try:
            certs = x509.load_pem_x509_certificates(chain.encode())
        except ValueError:
            raise DstackError(ACME_FIELD, "certbot returned no PEM certificate chain") from None
        leaf = certs[0]
        if spki_der(leaf.public_key()) != der:
            raise DstackError(ACME_FIELD, "the issued certificate is not for the key the gateway made")
        try:
            issued = sorted(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                            .get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            issued = []
        if issued != sorted(names):
            raise DstackError(ACME_FIELD, f"the issued certificate names {issued}, not {sorted(names)}")
        return Certificate(name, tuple(names), chain, _private_pem(key), der.hex(),
                           leaf.not_valid_after_utc.timestamp(), time.time())

    def renew(self, force=False, wait=0.0, name=None, names=None):
        """Order a new certificate for `name` (default the wildcard) when it is due (or `force`):
        (renewed, reason). Another holder of its lock (another node ordering it) after `wait`
        seconds: (False, that reason); when it is released in time the certificate it stored is
        seen, and nothing is ordered unless forced."""
        name, names = name or self.name, list(names or self.names)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.store.lock(f"acme-cert/{name}", ttl=LOCK_TTL, wait=wait))
            except Unavailable as exc:
                return False, f"not ordered here: {exc.reason}"
            current = self.certificate(name)
            reason = "forced" if force else self.due(current, names=names)
            if not reason:
                return False, f"valid until {_utc(current.not_after)}"
            log.info("ordering a certificate for %s: %s", ", ".join(names), reason)
            certificate = self._order(name, names)
            return True, f"{reason}: issued, valid until {_utc(certificate.not_after)}"

    def ensure_current(self):
        """At start: a valid certificate, ordered now if due (waiting out another node's order)."""
        renewed, reason = self.renew(wait=self.settings["renew_timeout"] + LOCK_TTL)
        current = self.certificate()
        if current is None:
            raise DstackError(ACME_FIELD, f"no certificate for {', '.join(self.names)}: {reason}")
        log.info("certificate for %s: %s", ", ".join(self.names), reason if renewed else f"kept ({reason})")
        return current

    # ---- CAA ---------------------------------------------------------------------------------------

    def set_caa(self):
        """CAA of the domain pinned to ca_name, DNS-01 and the account (dstack's guarded change,
        skipped when the records are already exactly those): ({domain: [(flags, tag, value)]}, changed)."""
        account = self.ensure_account()
        records, changed = dns_provider.set_caa(self.provider, self.name, self.settings["ca_name"], account["uri"])
        return {self.name: records}, changed


class ServedCertificate:
    """The data plane's view of a certificate in the store: load() gives new TLS contexts when it
    changed since the last call (None when it did not, or there is none)."""

    def __init__(self, store, name, scratch_dir):
        self.store, self.name, self.scratch_dir = store, name, scratch_dir
        self.fingerprint = None

    def load(self):
        data = self.store.get_blob(CERT_BLOB + self.name)
        if not data:
            return None
        certificate = Certificate.from_json(data)
        if certificate.fingerprint == self.fingerprint:
            return None
        contexts = contexts_for(certificate, self.scratch_dir)
        self.fingerprint = certificate.fingerprint
        return contexts


def contexts_for(certificate, scratch_dir):
    """The two termination contexts (proxy.server_contexts) of a Certificate. ssl loads keys only
    from files: they are written 0600 in the (0700) state folder and removed at once."""
    os.makedirs(scratch_dir, mode=0o700, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tls-", dir=scratch_dir) as folder:
        chain, key = os.path.join(folder, "chain.pem"), os.path.join(folder, "key.pem")
        atomic_write(chain, certificate.chain.encode(), mode=0o600)
        atomic_write(key, certificate.key.encode(), mode=0o600)
        try:
            return server_contexts(chain, key)
        except (OSError, ssl.SSLError) as exc:
            raise DstackError(ACME_FIELD, f"the stored certificate for {certificate.name} does not load: {exc}") from None


class RenewalSchedule:
    """Every renew_interval, renew what is due (a thread of serve's supervisor); failures are
    logged and retried at the next round. `also`: more renewals of the round, called after the
    wildcard's (custom_certs.DeclaredDomains.renew_all: the apps' custom domains)."""

    def __init__(self, manager, also=()):
        self.manager = manager
        self.also = tuple(also)
        self.stop_event = threading.Event()
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._run, name="acme renewal", daemon=True)
        self.thread.start()
        return self

    def _run(self):
        interval = self.manager.settings["renew_interval"]
        while not self.stop_event.wait(interval):
            try:
                renewed, reason = self.manager.renew()
                log.log(logging.INFO if renewed else logging.DEBUG, "renewal check: %s", reason)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                log.warning("renewal of %s failed, retried in %.0f s: %s", ", ".join(self.manager.names), interval, exc)
            for renew in self.also:
                try:
                    renew()
                except Exception as exc:  # pylint: disable=broad-exception-caught
                    log.warning("renewal round failed, retried in %.0f s: %s", interval, exc)

    def stop(self):
        self.stop_event.set()
        if self.thread is not None:
            # A renewal under way is not waited for: its certbot finishes alone and its lock expires.
            self.thread.join(2)
