"""Issue 11 finding 8, the request parser all three agents share (agents/wsgi.py): deeply nested
JSON was a RecursionError, a 500, on the KMS, the VMM and the guest agent. Replayed as found
against the real processes (dstack-kms serve over HTTPS, dstack-vmm serve, dstack-guest-agent
simulate on its unix socket), it is now a 400 naming the request; the body size limits stay.
"""

import http.client
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from hypothesis import given, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

# pylint: disable=wrong-import-position
from ansible_collections.dstack.tee.plugins.module_utils.json_limits import MAX_JSON_DEPTH, json_depth  # noqa: E402
from conftest import free_port  # noqa: E402
from test_guest_api import Agent  # noqa: E402
from test_kms_server import KmsProcess  # noqa: E402
from test_vmm import BIN, VmmProcess  # noqa: E402

DEEP = b"[" * 100000
DEEP_INSIDE = b'{"report_data": ' + b"[" * 100000 + b"]" * 100000 + b"}"
JUST_DEEP_ENOUGH = ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode()


def _kms_post(kms, path, body):
    context = ssl.create_default_context(cafile=str(kms.state_dir / "root-ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", kms.port, timeout=30, context=context)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def _http_post(port, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def _oversized(conn, path, length):
    """The status of a POST that announces a body of `length` bytes and sends none: the size is
    refused from Content-Length (sending the body could race the server's early close)."""
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def _refused_as_deep(status, data):
    assert status == 400, (status, data[:200])
    assert json.loads(data)["error"] == f"request: nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"


def test_finding_8_deep_json_is_a_400_on_the_kms(tmp_path):
    kms = KmsProcess(tmp_path / "kms", free_port()).start()
    try:
        for path in ("/prpc/KMS.GetMeta", "/prpc/KMS.GetAppKey", "/prpc/KMS.SignCert"):
            _refused_as_deep(*_kms_post(kms, path, DEEP))
            _refused_as_deep(*_kms_post(kms, path, DEEP_INSIDE))
        # JSON as deep as the limit still parses (GetMeta takes no parameter; the body is an array).
        status, data = _kms_post(kms, "/prpc/KMS.GetMeta", JUST_DEEP_ENOUGH)
        assert status == 400 and json.loads(data)["error"] == "request: the body must be a JSON object"
        context = ssl.create_default_context(cafile=str(kms.state_dir / "root-ca.crt"))
        assert _oversized(http.client.HTTPSConnection("127.0.0.1", kms.port, timeout=30, context=context),
                          "/prpc/KMS.GetMeta", 300 * 1024) == 413
        status, data = _kms_post(kms, "/prpc/KMS.GetMeta", b"{}")
        assert status == 200 and json.loads(data)["k256_pubkey"]
    finally:
        kms.stop()


def test_finding_8_deep_json_is_a_400_on_the_vmm(short_tmp):
    vmm = VmmProcess(short_tmp / "run", None, free_port()).start()
    try:
        for path in ("/prpc/Vmm.Status", "/prpc/Vmm.CreateVm", "/logs",
                     "/host-api/00000000-0000-0000-0000-000000000000/token/Notify"):
            _refused_as_deep(*_http_post(vmm.port, path, DEEP))
            _refused_as_deep(*_http_post(vmm.port, path, DEEP_INSIDE))
        assert _oversized(http.client.HTTPConnection("127.0.0.1", vmm.port, timeout=30), "/prpc/Vmm.Status",
                          3 * 1024 * 1024) == 413
        status, data = _http_post(vmm.port, "/prpc/Vmm.Status", b"{}")
        assert status == 200 and json.loads(data)["vms"] == []
    finally:
        vmm.stop()
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(short_tmp / "run" / "supervisor" / "supervisord.conf"),
                        "shutdown"], capture_output=True, check=False)


def test_finding_8_deep_json_is_a_400_on_the_guest_agent():
    base = tempfile.mkdtemp(prefix="dga-", dir="/tmp")
    agent = Agent(base).start()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)), base_url="http://localhost") as client:
            for path in ("/GetQuote", "/GetKey", "/prpc/Tappd.TdxQuote"):
                for body in (DEEP, DEEP_INSIDE):
                    answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
                    _refused_as_deep(answer.status_code, answer.content)
            # dstack's own clients keep working: GET with a query, and the SDK's JSON POST.
            assert client.get("/GetQuote", params={"report_data": "00"}).status_code == 200
            assert agent.client().get_quote(b"x").quote
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def _depth(value):
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('[]{}"\\ax\u00e9,:')),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet='[]{}"\\k'), inner, max_size=4),
    max_leaves=40)


@given(JSON_VALUES, st.booleans())
def test_the_depth_scan_counts_what_the_parser_nests(value, ascii_only):
    """Brackets inside strings (escaped quotes and backslashes included) do not count."""
    assert json_depth(json.dumps(value, ensure_ascii=ascii_only)) == _depth(value)


@pytest.mark.parametrize("text, depth", [('"\\\\"', 0), ('["\\"]"]', 1), ('[{"a": "[{"}, [[]]]', 3), ("[[[", 3)])
def test_the_depth_scan_on_edge_cases(text, depth):
    assert json_depth(text) == depth
