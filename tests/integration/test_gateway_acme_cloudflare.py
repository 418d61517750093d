"""The gateway's Cloudflare DNS provider (agents/gateway/dns_provider.py: Cloudflare) on the records
it writes itself: CAA in dstack's guarded order, the custom domains' TXT (set-txt's
custom_certs.set_app_address), a refused token named without the token.

Cloudflare itself cannot be reached from the tests, so its v4 API is served here over real HTTP
by a small server keeping the zone's records as Cloudflare's API shows them (zones by name,
dns_records listed by type and name, created, deleted; a bad token a 403 with Cloudflare's error
body). certbot-dns-cloudflare's own DNS-01 is certbot's (the RFC 2136 path tests the flow).
"""

import http.server
import itertools
import json
import secrets
import threading
import urllib.parse

import pytest

from ansible_collections.dstack.tee.agents.gateway import custom_certs, dns_provider

ZONE = "example.com"
ZONE_ID = "023e105f4ecef8ad9ca31a8372d0c353"
ACCOUNT_URI = "https://acme-v02.api.letsencrypt.org/acme/acct/1234"


class CloudflareApi(http.server.ThreadingHTTPServer):
    """Cloudflare's v4 API for one zone: records {id: {type, name, content, data}}, a log of writes."""

    def __init__(self, token):
        super().__init__(("127.0.0.1", 0), CloudflareHandler)
        self.token, self.records, self.writes, self.ids = token, {}, [], itertools.count(1)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/client/v4"

    def add(self, rtype, name, content=None, data=None):
        record_id = f"r{next(self.ids)}"
        if rtype == "CAA":
            content = f'{data["flags"]} {data["tag"]} "{data["value"]}"'
        self.records[record_id] = {"id": record_id, "type": rtype, "name": name, "content": content, "data": data}
        return self.records[record_id]


class CloudflareHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # pylint: disable=arguments-differ
        del args

    def _answer(self, status, result=None, errors=()):
        body = json.dumps({"success": status == 200, "errors": list(errors), "result": result}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method):
        api = self.server
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            return self._answer(403, errors=[{"code": 9109, "message": "Invalid access token"}])
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.removeprefix("/client/v4/").split("/")
        if method == "GET" and parts == ["zones"]:
            return self._answer(200, [{"id": ZONE_ID, "name": ZONE}] if query.get("name") == ZONE else [])
        if parts[:3] != ["zones", ZONE_ID, "dns_records"]:
            return self._answer(404, errors=[{"code": 7003, "message": "Could not route"}])
        if method == "GET":
            return self._answer(200, [r for r in api.records.values()
                                      if r["type"] == query.get("type") and r["name"] == query.get("name")])
        if method == "POST":
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            record = api.add(body["type"], body["name"], body.get("content"), body.get("data"))
            api.writes.append(("add", record["type"], record["name"], record["content"]))
            return self._answer(200, record)
        record = api.records.pop(parts[3])
        api.writes.append(("del", record["type"], record["name"], record["content"]))
        return self._answer(200, {"id": record["id"]})

    def do_GET(self):  # noqa: N802  pylint: disable=invalid-name
        self._route("GET")

    def do_POST(self):  # noqa: N802  pylint: disable=invalid-name
        self._route("POST")

    def do_DELETE(self):  # noqa: N802  pylint: disable=invalid-name
        self._route("DELETE")


@pytest.fixture
def cloudflare():
    api = CloudflareApi("cf-token-" + secrets.token_hex(12))
    thread = threading.Thread(target=api.serve_forever, daemon=True)
    thread.start()
    yield api
    api.shutdown()
    api.server_close()


def _provider(api, tmp_path, token):
    path = tmp_path / "cloudflare.ini"
    path.write_text(f"dns_cloudflare_api_token = {token}\n")
    path.chmod(0o600)
    provider = dns_provider.open_provider("cloudflare", str(path))
    provider.api = api.url      # Cloudflare's address, here the local one
    return provider


def test_caa_is_pinned_in_dstacks_order_through_cloudflare(cloudflare, tmp_path):
    provider = _provider(cloudflare, tmp_path, cloudflare.token)
    cloudflare.add("CAA", ZONE, data={"flags": 0, "tag": "issue", "value": "other-ca.example"})
    records, changed = dns_provider.set_caa(provider, ZONE, "letsencrypt.org", ACCOUNT_URI)
    value = f"letsencrypt.org;validationmethods=dns-01;accounturi={ACCOUNT_URI}"
    assert changed and records == [(0, "issue", value), (0, "issuewild", value)]
    assert [(op, content) for op, _type, _name, content in cloudflare.writes] == [
        ("add", '0 issue ";"'), ("add", '0 issuewild ";"'), ("del", '0 issue "other-ca.example"'),
        ("add", f'0 issue "{value}"'), ("add", f'0 issuewild "{value}"'), ("del", '0 issue ";"'),
        ("del", '0 issuewild ";"')]
    # Already pinned: nothing written.
    writes = len(cloudflare.writes)
    assert dns_provider.set_caa(provider, ZONE, "letsencrypt.org", ACCOUNT_URI) == (records, False)
    assert len(cloudflare.writes) == writes


def test_a_custom_domains_txt_record_through_cloudflare(cloudflare, tmp_path):
    provider = _provider(cloudflare, tmp_path, cloudflare.token)
    app_id = "ab" * 20
    done = custom_certs.set_app_address(provider, "_dstack-app-address", f"shop.{ZONE}", app_id, 443)
    assert done == {"changed": True, "name": f"_dstack-app-address.shop.{ZONE}", "type": "TXT",
                    "value": f"{app_id}:443", "before": []}
    assert provider.txt(f"_dstack-app-address.shop.{ZONE}") == [f"{app_id}:443"]
    # Again: left alone; another port: the old value replaced, not added to.
    assert custom_certs.set_app_address(provider, "_dstack-app-address", f"shop.{ZONE}", app_id, 443)["changed"] is False
    done = custom_certs.set_app_address(provider, "_dstack-app-address", f"shop.{ZONE}", app_id, 8443)
    assert done["changed"] and done["before"] == [f"{app_id}:443"]
    assert [r["content"] for r in cloudflare.records.values() if r["type"] == "TXT"] == [f"{app_id}:8443"]
    # A name in no zone the token can see: named.
    with pytest.raises(dns_provider.DnsError, match="no Cloudflare zone these credentials can see holds"):
        provider.txt("_dstack-app-address.shop.example.org")


def test_a_refused_token_is_named_without_the_token(cloudflare, tmp_path):
    wrong = "cf-token-" + secrets.token_hex(12)
    provider = _provider(cloudflare, tmp_path, wrong)
    with pytest.raises(dns_provider.DnsError) as refused:
        dns_provider.set_caa(provider, ZONE, "letsencrypt.org", ACCOUNT_URI)
    said = str(refused.value)
    assert "Cloudflare answered HTTP 403: Invalid access token" in said and str(tmp_path / "cloudflare.ini") in said
    assert wrong not in said and cloudflare.token not in said and cloudflare.writes == []
