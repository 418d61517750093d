# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""An outsider's check of a deployed app, from its URL, its compose file and the trust roots
(the dstack.tee.verify_app module, playbooks/verify-app.yml).

1. worker        a fresh random nonce to the CVM's Worker API through the gateway
                 (POST https://<id>-8090.<base>/prpc/Worker.Attest): a quote and its event log;
2. the quote     the one verifier (attestation.verify_quote through a QuoteTrust): DCAP under the
                 trust root, TCB policy, no debug TD, report_data = worker_report_data(nonce), the
                 event log replayed to RTMR3; its checks are listed under their own names;
3. compose_hash  the attested compose_hash is the local compose's (computed as roles/app does);
   app_id        the attested app_id is the expected one, or the URL's id is the answering
   instance_id   CVM's instance (the gateway routes an instance_id to that CVM);
4. tls           the certificate served for the URL validates for its name under the given CA
                 (OpenSSL does that in gateway_http.fetch); when it carries dstack's attestation
                 extension (a passthrough app with its RA-TLS certificate) its quote is verified
                 too and must be the same app (instance, compose); otherwise it is the gateway's
                 (reported as such: the gateway's own certificate is not bound to an attestation here);
5. app           GET the URL itself: an HTTP answer below 500.

A check that fails does not stop the ones after it, except the worker and the quote: without a
verified quote there is nothing to compare. The first failure is the one a caller names.
"""

import json
import os
from dataclasses import dataclass

from ansible_collections.dstack.tee.plugins.module_utils import app_certs, app_compose, app_folder, attestation, gateway_http, ra_tls
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_text

try:
    from cryptography import x509
    from cryptography.x509.oid import NameOID
except ImportError:  # reported by callers through ra_tls.HAS_CRYPTOGRAPHY
    pass

NONCE_BYTES = 32
# What a person reads when these checks fail: what the failure means for this check.
_MEANING = {
    "report_data": "the quote is not over this check's nonce (a replayed or another CVM's quote)",
}


@dataclass
class LocalApp:
    """What a deploy of the local compose would run: its compose_hash (and the app it is named)."""
    name: str
    compose_hash: str
    source: str


def local_app(compose=None, app_dir=None, name=None, options=None):
    """The compose_hash of a compose file (compose) or an app folder (app_dir: read by app_folder, as
    roles/app reads it: the name from app.yml, else the folder's name; app.yml's fields); `name` and
    `options` (app-compose fields) given here win."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if app_dir:
        app = app_folder.read(app_dir, name, options)
        return LocalApp(name=app.name, compose_hash=app_compose.compose_hash(app_compose.render(app.app_compose)),
                        source=os.path.join(app.path, app_folder.COMPOSE_FILE))
    if not compose:
        raise DstackError("compose", "is required (or app_dir)")
    name = name or os.path.basename(os.path.dirname(os.path.abspath(compose)))
    text = read_text(compose, "compose")
    app_compose.parse_compose_yaml(text, "compose")
    data = app_compose.render(app_compose.build(text, name, **options))
    return LocalApp(name=name, compose_hash=app_compose.compose_hash(data), source=compose)


def _names(cert):
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _issuer(cert):
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value if names else cert.issuer.rfc4514_string()


class AppCheck:
    """One outsider's check (run() once). url: an AppUrl; local: a LocalApp; trust: an
    attestation.QuoteTrust (ModuleTrust); ca_cert: the CA file the URL's TLS must validate under
    (None: the system's); expected_app_id: hex, or None (then the URL's id, an app or an instance)."""

    def __init__(self, url, local, trust, ca_cert=None, expected_app_id=None, timeout=30.0, wait_timeout=0.0,
                 connect_to=None):
        self.url = url
        self.connect_to = connect_to
        self.local = local
        self.trust = trust
        self.ca_cert = ca_cert
        self.expected_app_id = parse_hex(expected_app_id, "expected_app_id", length=20).hex() \
            if expected_app_id else None
        self.timeout = timeout
        self.wait_timeout = wait_timeout
        self.context = gateway_http.ssl_context(ca_cert)
        self.checks = []
        self.verification = None
        self.boot = {}
        self.tls_line = ""
        self.app_line = ""

    def add(self, name, ok, detail):
        self.checks.append(attestation.Check(name, bool(ok), detail))

    @property
    def ok(self):
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failed(self):
        return next((c for c in self.checks if not c.ok), None)

    def _fetch(self, url, **kwargs):
        return gateway_http.fetch(url, context=self.context, ca_cert=self.ca_cert, timeout=self.timeout,
                                  wait_timeout=self.wait_timeout, connect_to=self.connect_to, **kwargs)

    def run(self):
        if self._attest():
            self._identity()
            # The URL and its certificate are checked even when the identity is not the expected
            # one: the report then says all that is wrong at once.
            self._app()
        return self

    # -- 1 and 2: the Worker's quote over a fresh nonce --

    def _attest(self):
        nonce = os.urandom(NONCE_BYTES)
        worker = self.url.worker_url + "/prpc/Worker.Attest"
        try:
            answer = self._fetch(worker, method="POST", body=json.dumps({"nonce": nonce.hex()}).encode(),
                                 headers={"Content-Type": "application/json"}, field="worker").json("worker")
            if not isinstance(answer, dict):
                raise DstackError("worker", f"{worker} did not answer a JSON object")
            quote = parse_hex(answer.get("quote", ""), "quote")
            event_log = answer.get("event_log")
            if not isinstance(event_log, str):
                raise DstackError("event_log", "is missing (the event log's JSON text)")
        except gateway_http.TlsRefused as exc:
            self.add("tls", False, exc.reason)
            return False
        except DstackError as exc:
            self.add("worker", False, exc.reason if exc.field == "worker" else f"{worker} answered: {exc}")
            return False
        self.add("worker", True, f"{self.url.worker_url} answered Worker.Attest over a fresh {NONCE_BYTES}-byte nonce")
        self.verification = self.trust.verify(quote, event_log, attestation.worker_report_data(nonce))
        for check in self.verification.checks:
            detail = check.detail if check.ok else _MEANING.get(check.name, check.detail)
            self.add(check.name, check.ok, detail)
        self.boot = self.verification.boot_info
        return self.verification.ok

    # -- 3: the attested identity against the local compose and the URL --

    def _identity(self):
        boot, local = self.boot, self.local
        attested = boot.get("compose_hash", "")
        self.add("compose_hash", attested == local.compose_hash,
                 f"{attested}, the local compose file's ({local.source})" if attested == local.compose_hash else
                 f"the CVM runs {attested or '(none measured)'}, the local compose file is {local.compose_hash} "
                 f"({local.source})")
        app_id, instance_id, named = boot.get("app_id", ""), boot.get("instance_id", ""), self.url.id
        if self.expected_app_id:
            self.add("app_id", app_id == self.expected_app_id,
                     f"{app_id}, the expected app" if app_id == self.expected_app_id else
                     f"the CVM that answered is app {app_id}, not the expected app {self.expected_app_id}")
            if named != self.expected_app_id:
                self.add("instance_id", named == instance_id,
                         f"{instance_id}, the instance the URL names" if named == instance_id else
                         f"the URL names {named}, which is neither the expected app nor the instance that "
                         f"answered ({instance_id or 'none'})")
        elif named == app_id:
            self.add("app_id", True, f"{app_id}, the URL's")
        elif instance_id and named == instance_id:
            self.add("instance_id", True, f"{instance_id}, the instance the URL names (app {app_id})")
        else:
            self.add("app_id", False, f"the CVM that answered is app {app_id} (instance {instance_id or 'none'}), "
                                      f"not the URL's {named}")

    # -- 4 and 5: the app's URL, its certificate and its answer --

    def _app(self):
        try:
            answer = self._fetch(self.url.url, method="GET", max_bytes=None)
        except gateway_http.TlsRefused as exc:
            self.add("tls", False, exc.reason)
            return
        except DstackError as exc:
            self.add("app", False, exc.reason)
            return
        self._tls(answer.peer_chain)
        self.app_line = f"HTTP {answer.status} {answer.reason}".strip()
        self.add("app", answer.status < 500, f"{self.url.url} answered {self.app_line}")

    def _tls(self, chain):
        try:
            leaf = x509.load_der_x509_certificate(chain[0])
        except (IndexError, ValueError):
            self.add("tls", False, "the server presented no readable certificate")
            return
        names = ", ".join(_names(leaf)) or "(no names)"
        try:
            leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(app_certs.OID_ATTESTATION))
        except x509.ExtensionNotFound:
            self.tls_line = f"terminated by the gateway (certificate for {names}, issuer {_issuer(leaf)})"
            self.add("tls", True, f"validates for {self.url.host} under "
                                  f"{self.ca_cert or 'the system trust store'}; {self.tls_line}")
            return
        try:
            served = ra_tls.attested_boot(leaf, self.trust)
        except DstackError as exc:
            self.add("tls", False, f"the certificate's attestation does not verify: {exc}")
            return
        problems = []
        if served.get("app_id") != self.boot.get("app_id"):
            problems.append(f"it is app {served.get('app_id')}'s, the Worker's quote app {self.boot.get('app_id')}'s")
        if self.url.id == self.boot.get("instance_id") and served.get("instance_id") != self.url.id:
            problems.append(f"it is instance {served.get('instance_id')}'s, the URL names instance {self.url.id}")
        if served.get("compose_hash") != self.local.compose_hash:
            problems.append(f"its CVM runs compose_hash {served.get('compose_hash')}, the local compose file is "
                            f"{self.local.compose_hash}")
        self.tls_line = (f"served by the attested CVM itself (RA-TLS certificate for {names}, app "
                         f"{served.get('app_id')}, instance {served.get('instance_id') or 'none'})")
        self.add("tls", not problems, "; ".join(problems) if problems else
                 f"validates for {self.url.host} under {self.ca_cert or 'the system trust store'}; {self.tls_line}")

    # -- what a caller returns --

    def report(self):
        """Short lines for a person."""
        lines = [f"app url:       {self.url.url}"]
        v, boot = self.verification, self.boot
        if boot.get("app_id"):
            lines.append(f"CVM:           app {boot['app_id']}, instance {boot.get('instance_id') or 'none'}")
        if v is not None and v.ok:
            lines.append(f"quote:         verified ({v.attestation_mode}, TCB {v.tcb_status}), over this check's "
                         f"fresh nonce, RTMR3 replayed")
        by_name = {c.name: c for c in self.checks}
        if "compose_hash" in by_name:
            lines.append(f"compose_hash:  {self.local.compose_hash}"
                         + (" (matches the local compose file)" if by_name["compose_hash"].ok else ""))
        if self.tls_line:
            lines.append(f"TLS:           {self.tls_line}")
        if self.app_line:
            lines.append(f"app answered:  {self.app_line}")
        lines += [f"FAILED {c.name}: {c.detail}" for c in self.checks if not c.ok]
        if self.ok:
            lines.append(f"all {len(self.checks)} checks passed")
        return lines

    def result(self):
        v = self.verification
        return dict(ok=self.ok, checks=[c.to_dict() for c in self.checks], app_id=self.boot.get("app_id", ""),
                    instance_id=self.boot.get("instance_id", ""), compose_hash=self.boot.get("compose_hash", ""),
                    local_compose_hash=self.local.compose_hash, tcb_status=v.tcb_status if v else "",
                    attestation_mode=v.attestation_mode if v else "", boot_info=dict(self.boot), report=self.report())
