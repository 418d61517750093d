# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's DNS providers behind one small interface: what certbot needs for DNS-01 (its
plugin and the credentials file) and the records the gateway writes itself (CAA, TXT).

    provider = open_provider("rfc2136", "/etc/dstack/dns.ini")
    provider.certbot_args(propagation_seconds=60)   # certbot's --dns-<name> flags
    provider.set_txt("_dstack-app-address.example.com", ["<app_id>:443"])
    provider.txt("_dstack-app-address.example.com")  # ["<app_id>:443"]
    provider.caa("example.com")                     # [(flags, tag, value), ...]
    set_caa(provider, "example.com", "letsencrypt.org", account_uri)   # dstack's guarded change, (records, changed)

Providers (the credentials file is the certbot plugin's own INI, so one file serves both):
    rfc2136     any standards DNS server taking TSIG-signed dynamic updates (BIND, Knot,
                PowerDNS); certbot-dns-rfc2136; updates through dnspython's dns.update.
                dns_rfc2136_server (an IP address, as the plugin requires), dns_rfc2136_port (53),
                dns_rfc2136_name (the TSIG key), dns_rfc2136_secret (base64), dns_rfc2136_algorithm
                (HMAC-SHA256 by default here; the plugin's own default is HMAC-MD5, so name it),
                dns_rfc2136_sign_query (sign the SOA look-ups too).
    cloudflare  certbot-dns-cloudflare; records through Cloudflare's v4 HTTP API.
                dns_cloudflare_api_token (a token with Zone:DNS:Edit), or dns_cloudflare_email and
                dns_cloudflare_api_key (the global key).

The credentials file must not be readable by others (0600, as certbot asks); its secrets never
appear in an error or a log line: every message names the file and the key, never a value, and
certbot's output passes through redact() before it is shown.
"""

import base64
import binascii
import ipaddress
import json
import logging
import os
import stat
import urllib.error
import urllib.parse
import urllib.request

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

log = logging.getLogger("dstack.gateway.dns")

PROVIDERS = ("rfc2136", "cloudflare")
DEFAULT_TTL = 60
DNS_TIMEOUT = 10.0
MAX_CREDENTIALS_BYTES = 64 * 1024
CLOUDFLARE_API = "https://api.cloudflare.com/client/v4"
CLOUDFLARE_ANSWER_BYTES = 4 * 1024 * 1024


class DnsError(DstackError):
    """The DNS provider refused or failed a change (names the provider's server and the record)."""


def read_credentials(path, field):
    """{key: value} of an INI credentials file (certbot's `key = value` lines, # comments); a file
    others may read is refused, as gateway_private_key refuses one."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise DstackError(field, f"{path} is not a file (the DNS provider's credentials)")
        if info.st_mode & 0o077:
            raise DstackError(field, f"{path} may be read by others (mode {info.st_mode & 0o777:04o}): chmod 600 it")
        with open(path, "rb") as handle:
            data = handle.read(MAX_CREDENTIALS_BYTES + 1)
    except OSError as exc:
        raise DstackError(field, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CREDENTIALS_BYTES:
        raise DstackError(field, f"{path} is larger than {MAX_CREDENTIALS_BYTES} bytes: not a credentials file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DstackError(field, f"{path} is not UTF-8 text") from None
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise DstackError(field, f"{path} line {number} is not `key = value`")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def caa_value(ca_name, account_uri):
    """dstack's pinned CAA value: `<ca>;validationmethods=dns-01;accounturi=<uri>`."""
    return f"{ca_name};validationmethods=dns-01;accounturi={account_uri}"


class DnsProvider:
    """What every provider offers. Names are absolute DNS names without the trailing dot."""

    name = ""
    secret_keys = ()

    def __init__(self, credentials_path, field="core.certbot.credentials"):
        self.path = os.path.abspath(credentials_path)
        self.field = field
        self.values = read_credentials(self.path, field)
        self._check()

    def _check(self):
        raise NotImplementedError

    def _require(self, key):
        value = self.values.get(key, "")
        if not value:
            raise DstackError(self.field, f"{self.path} has no {key} (the {self.name} provider needs it)")
        return value

    def redact(self, text):
        """`text` with every secret of the credentials file replaced by <hidden>."""
        for key in self.secret_keys:
            secret = self.values.get(key)
            if secret and len(secret) >= 4:
                text = text.replace(secret, "<hidden>")
        return text

    def certbot_args(self, propagation_seconds):
        """certbot's flags for DNS-01 through this provider."""
        return [f"--dns-{self.name}", f"--dns-{self.name}-credentials", self.path,
                f"--dns-{self.name}-propagation-seconds", str(int(propagation_seconds))]

    def explain(self, certbot_text):
        """A hint for a certbot failure of this provider ("" when there is none to give)."""
        del certbot_text
        return ""

    # The records: each change is whole or not at all (one update message, one API call).
    def set_txt(self, name, values, ttl=DEFAULT_TTL):
        raise NotImplementedError

    def delete_txt(self, name):
        raise NotImplementedError

    def txt(self, name):
        """The TXT values of `name` as the provider holds them (sorted; [] for none)."""
        raise NotImplementedError

    def caa(self, name):
        raise NotImplementedError

    def add_caa(self, name, records, ttl=DEFAULT_TTL):
        raise NotImplementedError

    def delete_caa(self, name, records):
        raise NotImplementedError


# ---- RFC 2136 -------------------------------------------------------------------------------------

class Rfc2136(DnsProvider):
    name = "rfc2136"
    secret_keys = ("dns_rfc2136_secret",)
    ALGORITHMS = ("HMAC-MD5", "HMAC-SHA1", "HMAC-SHA224", "HMAC-SHA256", "HMAC-SHA384", "HMAC-SHA512")

    def _check(self):
        server = self._require("dns_rfc2136_server")
        try:
            self.server = str(ipaddress.ip_address(server))
        except ValueError:
            raise DstackError(self.field, f"{self.path}: dns_rfc2136_server must be an IP address (certbot's "
                                          "rfc2136 plugin takes no host name)") from None
        port = self.values.get("dns_rfc2136_port", "53")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise DstackError(self.field, f"{self.path}: dns_rfc2136_port must be a port number")
        self.port = int(port)
        self.key_name = self._require("dns_rfc2136_name")
        secret = self._require("dns_rfc2136_secret")
        try:
            base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise DstackError(self.field, f"{self.path}: dns_rfc2136_secret is not base64 (tsig-keygen prints "
                                          "the key's secret)") from None
        algorithm = self.values.get("dns_rfc2136_algorithm", "HMAC-SHA256").upper()
        if algorithm not in self.ALGORITHMS:
            raise DstackError(self.field, f"{self.path}: dns_rfc2136_algorithm must be one of "
                                          f"{', '.join(self.ALGORITHMS)}")
        self.algorithm = algorithm
        self.sign_query = self.values.get("dns_rfc2136_sign_query", "").upper() == "TRUE"

    def explain(self, certbot_text):
        lowered = certbot_text.lower()
        if "signature" in lowered or "badsig" in lowered or "badkey" in lowered or "notauth" in lowered:
            return (f"the DNS server {self.where} refused the TSIG key {self.key_name!r}: check dns_rfc2136_name, "
                    f"dns_rfc2136_secret and dns_rfc2136_algorithm in {self.path}")
        if "refused" in lowered:
            return (f"the DNS server {self.where} refused the update: its update-policy must let the key "
                    f"{self.key_name!r} change the _acme-challenge TXT records")
        if "timed out" in lowered or "timeout" in lowered or "connection refused" in lowered:
            return f"no answer from the DNS server {self.where} (dns_rfc2136_server and dns_rfc2136_port in {self.path})"
        return ""

    @property
    def where(self):
        return f"{self.server}:{self.port}"

    def _tsig(self):
        import dns.tsig  # pylint: disable=import-outside-toplevel
        import dns.tsigkeyring  # pylint: disable=import-outside-toplevel
        keyring = dns.tsigkeyring.from_text({self.key_name: self.values["dns_rfc2136_secret"]})
        algorithm = getattr(dns.tsig, self.algorithm.replace("-", "_"))
        return keyring, algorithm

    def _send(self, message, what):
        """One message over TCP (UDP for a plain query TCP could not carry); the answer."""
        import dns.exception  # pylint: disable=import-outside-toplevel
        import dns.query  # pylint: disable=import-outside-toplevel
        import dns.tsig  # pylint: disable=import-outside-toplevel
        try:
            return dns.query.tcp(message, self.server, timeout=DNS_TIMEOUT, port=self.port)
        except (dns.tsig.PeerBadSignature, dns.tsig.PeerBadKey, dns.tsig.PeerBadTime, dns.tsig.BadSignature) as exc:
            raise DnsError(self.field, f"{what}: the DNS server {self.where} refused the TSIG key {self.key_name!r} "
                                       f"({type(exc).__name__}): check dns_rfc2136_name, dns_rfc2136_secret and "
                                       f"dns_rfc2136_algorithm in {self.path}") from None
        except dns.exception.Timeout:
            raise DnsError(self.field, f"{what}: no answer from the DNS server {self.where} in "
                                       f"{DNS_TIMEOUT:.0f} s") from None
        except (OSError, EOFError, dns.exception.DNSException) as exc:
            raise DnsError(self.field, f"{what}: the DNS server {self.where} failed: "
                                       f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None

    def zone_of(self, name):
        """The zone holding `name`: the closest enclosing name the server answers an SOA for with
        authority (as certbot's plugin finds it)."""
        import dns.flags  # pylint: disable=import-outside-toplevel
        import dns.message  # pylint: disable=import-outside-toplevel
        import dns.name  # pylint: disable=import-outside-toplevel
        import dns.rcode  # pylint: disable=import-outside-toplevel
        import dns.rdatatype  # pylint: disable=import-outside-toplevel
        labels = name.rstrip(".").split(".")
        for start in range(len(labels) - 1):
            guess = dns.name.from_text(".".join(labels[start:]))
            query = dns.message.make_query(guess, dns.rdatatype.SOA)
            query.flags &= ~dns.flags.RD
            if self.sign_query:
                keyring, algorithm = self._tsig()
                query.use_tsig(keyring, keyname=self.key_name, algorithm=algorithm)
            answer = self._send(query, f"finding the zone of {name}")
            if (answer.rcode() == dns.rcode.NOERROR and answer.flags & dns.flags.AA
                    and answer.get_rrset(answer.answer, guess, 1, dns.rdatatype.SOA)):
                return guess.to_text().rstrip(".")
        raise DnsError(self.field, f"the DNS server {self.where} is not authoritative for {name} or any name above it")

    def _update(self, name, change, what):
        """One RFC 2136 update of `name`'s zone, TSIG-signed; change(update, relative name)."""
        import dns.name  # pylint: disable=import-outside-toplevel
        import dns.rcode  # pylint: disable=import-outside-toplevel
        import dns.update  # pylint: disable=import-outside-toplevel
        zone = self.zone_of(name)
        keyring, algorithm = self._tsig()
        update = dns.update.UpdateMessage(zone, keyring=keyring, keyname=self.key_name, keyalgorithm=algorithm)
        change(update, dns.name.from_text(name))
        answer = self._send(update, what)
        rcode = answer.rcode()
        if rcode == dns.rcode.NOERROR:
            return
        reason = {dns.rcode.REFUSED: f"REFUSED (the zone's update-policy must let the key {self.key_name!r} change it)",
                  dns.rcode.NOTAUTH: f"NOTAUTH (the TSIG key {self.key_name!r} was not accepted, or the server is not "
                                     f"authoritative for {zone}: check {self.path})"}.get(rcode, dns.rcode.to_text(rcode))
        raise DnsError(self.field, f"{what}: the DNS server {self.where} answered {reason}")

    def set_txt(self, name, values, ttl=DEFAULT_TTL):
        import dns.rdatatype  # pylint: disable=import-outside-toplevel
        quoted = [json.dumps(v) for v in values]  # TXT strings in zone-file quoting

        def change(update, owner):
            if quoted:
                update.replace(owner, ttl, dns.rdatatype.TXT, *quoted)
            else:
                update.delete(owner, "TXT")
        self._update(name, change, f"setting the TXT record of {name}")

    def delete_txt(self, name):
        self._update(name, lambda update, owner: update.delete(owner, "TXT"), f"deleting the TXT record of {name}")

    def txt(self, name):
        import dns.flags  # pylint: disable=import-outside-toplevel
        import dns.message  # pylint: disable=import-outside-toplevel
        import dns.rdatatype  # pylint: disable=import-outside-toplevel
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD
        answer = self._send(query, f"reading the TXT record of {name}")
        return sorted(b"".join(r.strings).decode("utf-8", "replace") for rrset in answer.answer
                      if rrset.rdtype == dns.rdatatype.TXT for r in rrset)

    def caa(self, name):
        import dns.flags  # pylint: disable=import-outside-toplevel
        import dns.message  # pylint: disable=import-outside-toplevel
        import dns.rdatatype  # pylint: disable=import-outside-toplevel
        query = dns.message.make_query(name, dns.rdatatype.CAA)
        query.flags &= ~dns.flags.RD
        answer = self._send(query, f"reading the CAA records of {name}")
        records = []
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.CAA:
                records.extend((r.flags, r.tag.decode(), r.value.decode()) for r in rrset)
        return sorted(records)

    @staticmethod
    def _caa_rdata(record):
        import dns.rdata  # pylint: disable=import-outside-toplevel
        flags, tag, value = record
        return dns.rdata.from_text("IN", "CAA", f"{int(flags)} {tag} {json.dumps(value)}")

    def add_caa(self, name, records, ttl=DEFAULT_TTL):
        def change(update, owner):
            for record in records:
                update.add(owner, ttl, self._caa_rdata(record))
        self._update(name, change, f"adding CAA records to {name}")

    def delete_caa(self, name, records):
        def change(update, owner):
            for record in records:
                update.delete(owner, self._caa_rdata(record))
        self._update(name, change, f"deleting CAA records of {name}")


# ---- Cloudflare -----------------------------------------------------------------------------------

class Cloudflare(DnsProvider):
    name = "cloudflare"
    secret_keys = ("dns_cloudflare_api_token", "dns_cloudflare_api_key")

    def _check(self):
        if self.values.get("dns_cloudflare_api_token"):
            self.headers = {"Authorization": f"Bearer {self.values['dns_cloudflare_api_token']}"}
        elif self.values.get("dns_cloudflare_email") and self.values.get("dns_cloudflare_api_key"):
            self.headers = {"X-Auth-Email": self.values["dns_cloudflare_email"],
                            "X-Auth-Key": self.values["dns_cloudflare_api_key"]}
        else:
            raise DstackError(self.field, f"{self.path} has no dns_cloudflare_api_token (or dns_cloudflare_email "
                                          "and dns_cloudflare_api_key)")
        self.api = CLOUDFLARE_API
        self._zones = {}

    def explain(self, certbot_text):
        lowered = certbot_text.lower()
        if "authentication" in lowered or ("invalid" in lowered and "token" in lowered) or "403" in lowered:
            return f"Cloudflare refused the credentials in {self.path} (the token needs Zone:DNS:Edit on the zone)"
        return ""

    def _call(self, method, path, body=None, what=""):
        request = urllib.request.Request(self.api + path, method=method, headers=dict(
            self.headers, **({"Content-Type": "application/json"} if body is not None else {})),
            data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(request, timeout=DNS_TIMEOUT) as answer:  # nosec: Cloudflare's API
                doc = json.loads(answer.read(CLOUDFLARE_ANSWER_BYTES))
        except urllib.error.HTTPError as exc:
            try:
                doc = json.loads(exc.read(CLOUDFLARE_ANSWER_BYTES))
                said = "; ".join(str(e.get("message", "")) for e in doc.get("errors", []))[:300]
            except (ValueError, AttributeError):
                said = ""
            hint = f" (check the credentials in {self.path})" if exc.code in (401, 403) else ""
            raise DnsError(self.field, self.redact(f"{what}: Cloudflare answered HTTP {exc.code}"
                                                   f"{': ' + said if said else ''}{hint}")) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DnsError(self.field, f"{what}: Cloudflare's API did not answer: "
                                       f"{getattr(exc, 'reason', None) or type(exc).__name__}") from None
        if not isinstance(doc, dict) or not doc.get("success"):
            raise DnsError(self.field, f"{what}: Cloudflare did not report success")
        return doc.get("result")

    def zone_id(self, name):
        """The id of the Cloudflare zone holding `name` (the closest enclosing zone)."""
        labels = name.rstrip(".").split(".")
        for start in range(len(labels) - 1):
            guess = ".".join(labels[start:])
            if guess not in self._zones:
                found = self._call("GET", "/zones?" + urllib.parse.urlencode({"name": guess}),
                                   what=f"finding the zone of {name}")
                self._zones[guess] = found[0]["id"] if found else None
            if self._zones[guess]:
                return self._zones[guess]
        raise DnsError(self.field, f"no Cloudflare zone these credentials can see holds {name}")

    def _records(self, name, rdtype):
        zone = self.zone_id(name)
        query = urllib.parse.urlencode({"type": rdtype, "name": name, "per_page": 100})
        return zone, self._call("GET", f"/zones/{zone}/dns_records?{query}", what=f"reading the {rdtype} records of {name}")

    def set_txt(self, name, values, ttl=DEFAULT_TTL):
        self.delete_txt(name)
        zone = self.zone_id(name)
        for value in values:
            self._call("POST", f"/zones/{zone}/dns_records", {"type": "TXT", "name": name, "content": value, "ttl": ttl},
                       what=f"setting the TXT record of {name}")

    def delete_txt(self, name):
        zone, records = self._records(name, "TXT")
        for record in records:
            self._call("DELETE", f"/zones/{zone}/dns_records/{record['id']}", what=f"deleting the TXT record of {name}")

    def txt(self, name):
        _zone, records = self._records(name, "TXT")
        # Cloudflare may give the content in zone-file quotes; the value is what is inside.
        return sorted(r["content"][1:-1] if len(r["content"]) > 1 and r["content"][0] == r["content"][-1] == '"'
                      else r["content"] for r in records)

    def caa(self, name):
        _zone, records = self._records(name, "CAA")
        return sorted((int(r["data"]["flags"]), r["data"]["tag"], r["data"]["value"]) for r in records)

    def add_caa(self, name, records, ttl=DEFAULT_TTL):
        zone = self.zone_id(name)
        for flags, tag, value in records:
            self._call("POST", f"/zones/{zone}/dns_records",
                       {"type": "CAA", "name": name, "ttl": ttl, "data": {"flags": flags, "tag": tag, "value": value}},
                       what=f"adding a CAA record to {name}")

    def delete_caa(self, name, records):
        zone, present = self._records(name, "CAA")
        wanted = set(records)
        for record in present:
            data = record["data"]
            if (int(data["flags"]), data["tag"], data["value"]) in wanted:
                self._call("DELETE", f"/zones/{zone}/dns_records/{record['id']}", what=f"deleting a CAA record of {name}")


def open_provider(kind, credentials_path, field="core.certbot"):
    """The provider `kind` ("rfc2136" or "cloudflare") with its credentials file."""
    classes = {"rfc2136": Rfc2136, "cloudflare": Cloudflare}
    if kind not in classes:
        raise DstackError(f"{field}.dns_provider", f"must be one of {', '.join(PROVIDERS)}")
    if not credentials_path:
        raise DstackError(f"{field}.credentials", f"is required: the {kind} credentials file (0600)")
    return classes[kind](credentials_path, f"{field}.credentials")


# ---- CAA: dstack's guarded change ---------------------------------------------------------------

GUARDS = ((0, "issue", ";"), (0, "issuewild", ";"))


def set_caa(provider, domain, ca_name, account_uri, ttl=DEFAULT_TTL):
    """Pin issuance for `domain` to ca_name through DNS-01 and the account, in dstack's order: the
    guards `issue ";"` and `issuewild ";"` first (no CA may issue while the set changes), every
    other CAA record deleted, `0 issue` and `0 issuewild` set to caa_value(), the guards removed.
    Returns (the records now there, whether anything changed): records already exactly these are
    left alone."""
    if not account_uri:
        raise DstackError("account_uri", "is empty: the gateway has no ACME account yet (start it with "
                                         "[core.certbot] enabled first)")
    value = caa_value(ca_name, account_uri)
    wanted = [(0, "issue", value), (0, "issuewild", value)]
    present = provider.caa(domain)
    if present == sorted(wanted):
        return present, False
    provider.add_caa(domain, [g for g in GUARDS if g not in present], ttl)
    others = [r for r in provider.caa(domain) if r not in GUARDS]
    if others:
        provider.delete_caa(domain, others)
    provider.add_caa(domain, wanted, ttl)
    provider.delete_caa(domain, list(GUARDS))
    now = provider.caa(domain)
    log.info("CAA of %s pinned to %s (dns-01, account %s): %d record(s)", domain, ca_name, account_uri, len(now))
    return now, True
