"""The VMM web UI in a real headless Chromium, against real dstack-vmm and dstack-kms processes.

The page deploys the sample app: it builds app-compose.json (the same bytes as our Python), checks
the KMS signature over the app's env key, encrypts the env in the browser and calls CreateVm; the
CVM boots, serves the decrypted env, shows its logs, stops and is removed. Screenshots of every
step go to test-artifacts/vmm-ui/.
"""

import hashlib
import http.client
import http.server
import json
import mimetypes
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
import warnings

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import root_keys
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils import kdf
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from conftest import IMAGE, ROOT, free_port, needs_podman
from test_vmm import OS_IMAGE, stack  # noqa: F401  pylint: disable=unused-import

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = ROOT / "test-artifacts" / "vmm-ui"
STATIC = ROOT / "agents" / "vmm" / "static"
TOKEN = "s3cret-token"
GREETING = "hello-from-the-ui \u00e9\u2713"
# test_vmm's app, saying something of its own on its stdout (what the Logs view shows) and naming
# its requests on its stderr (httpd -vv).
COMPOSE = f"""services:
  web:
    image: {IMAGE}
    command:
      - /bin/sh
      - -c
      - >-
        echo web is up, serving its greeting; mkdir -p /www && echo "$$GREETING" > /www/index.html
        && env > /www/env.txt && exec httpd -f -vv -p 80 -h /www
    ports:
      - "8080:80"
    environment:
      GREETING: ${{GREETING}}
"""
# The browser flags of machine-recipes.md ("Browsers"); --user-data-dir is added per run.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1400,1600")

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium and chromium-driver (Debian packages) are installed by scripts/setup.sh")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver  # pylint: disable=import-outside-toplevel
    from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


class Page:
    """The UI in the browser, with the waits and reads the tests need."""

    def __init__(self, driver, base_url):
        self.driver, self.base_url = driver, base_url

    def open(self):
        self.driver.get(self.base_url + "/")

    def find(self, css):
        from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css):
        from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def text(self, css):
        """textContent, exactly (Selenium's .text folds whitespace)."""
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)

    def visible(self, css):
        return self.js("const e = document.querySelector(arguments[0]); return !!e && !e.closest('[hidden]');", css)

    def wait(self, what, condition, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        self.shot("timeout")
        raise AssertionError(f"timed out waiting for {what}; the browser console said: {self.console()}")

    def type(self, css, text):
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def set_value(self, css, value):
        self.js("const e = document.querySelector(arguments[0]); e.value = arguments[1];"
                "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));", css, value)

    def check(self, css, on):
        self.js("document.querySelector(arguments[0]).checked = arguments[1];", css, on)

    def shot(self, name):
        self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def row(self, vm_id):
        return f'tr[data-vm-id="{vm_id}"]'

    def console(self):
        return [entry["message"] for entry in self.driver.get_log("browser")]

    def prepared(self):
        """What the page's deploy form makes: app-compose.json bytes (hex), compose_hash, app_id."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "window.dstackVmmUi.prepareFromForm().then("
            "  p => done({hex: window.dstackVmmUi.toHex(p.bytes), hash: p.composeHash, app_id: p.appId}),"
            "  e => done({error: e.message}));")


class _StaticFront(http.server.ThreadingHTTPServer):
    """What the VMM should do and does not yet: serve its static UI (no secret in it) without a
    token. Every other request goes to the real VMM unchanged, tokens and answers included."""

    daemon_threads = True

    def __init__(self, vmm_port):
        self.vmm_port = vmm_port
        super().__init__(("127.0.0.1", 0), _FrontHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # pylint: disable=arguments-differ
        pass

    def do_GET(self):  # pylint: disable=invalid-name
        name = "index.html" if self.path == "/" else self.path[5:] if self.path.startswith("/res/") else None
        path = (STATIC / name).resolve() if name else None
        if path is None or STATIC not in path.parents or not path.is_file():
            self.forward()
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(str(path))[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # pylint: disable=invalid-name
        self.forward()

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "x-admin-token", "content-type")}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.vmm_port, timeout=30)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.getheader("Content-Type", "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def ui_url(stack):
    """The page's address: the VMM itself when it serves its UI without a token, else a front."""
    _kms, vmm = stack
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{vmm.port}/", timeout=5).close()  # pylint: disable=consider-using-with
        yield f"http://127.0.0.1:{vmm.port}"
        return
    except urllib.error.HTTPError as err:
        if err.code != 401:
            raise
    warnings.warn("dstack-vmm asks for a token for / and /res/ (its static UI): the browser cannot load the page "
                  "without it; the test serves the UI from a same-origin front until the VMM exempts them")
    front = _StaticFront(vmm.port)
    yield f"http://127.0.0.1:{front.server_address[1]}"
    front.shutdown()
    front.server_close()


def _login(page):
    page.open()
    page.wait("the token prompt", lambda: page.visible("#token-panel"))
    page.type("#token-input", TOKEN)
    page.find("#token-submit").click()
    page.wait("the VM list", lambda: page.js("return document.body.dataset.ready === '1'"))


def _get(url, attempts=50):
    for _attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


def _allow(kms, app_compose_bytes):
    """Put the app and its compose_hash in the KMS allowlist (as test_vmm.app_files does)."""
    chash = compose.compose_hash(app_compose_bytes)
    app_id = compose.app_id_for(chash)
    path = kms.state_dir / "auth-config.json"
    allow = json.loads(path.read_text())
    allow["osImages"] = ["0x" + OS_IMAGE]
    allow.setdefault("apps", {})["0x" + app_id] = {"composeHashes": ["0x" + chash], "allowAnyDevice": True}
    path.write_text(json.dumps(allow))
    return chash, app_id


# ---- app-compose bytes, signatures: the page's JS against our Python --------------------------------

FORM_CASES = [
    # (app name, compose text, allowed env names, key_provider, checked options)
    ("hello", (ROOT / "examples" / "hello" / "docker-compose.yaml").read_text(), ["GREETING", "API_TOKEN"], "kms",
     {"public_logs": True}),
    ("app (u-less) ~!$^@.", "services:\n  w\u00e9b:\n    image: \"x\\\\y\"\n    command: [\"echo\", \"\u6f22\u5b57 \U0001F600 "
     "\u2028 \t tab \\\"\"]\n", ["A_1", "_b", "Z"], "local",
     {"public_sysinfo": True, "no_instance_id": True, "secure_time": False, "gateway_enabled": False,
      "public_tcbinfo": False}),
    ("plain", "services: {web: {image: busybox, ports: ['8080:80', '127.0.0.1:9000:9000/udp']}}\n", [], "none", {}),
]
OPTIONS = ("gateway_enabled", "public_logs", "public_sysinfo", "public_tcbinfo", "no_instance_id", "secure_time")
DEFAULT_ON = ("gateway_enabled", "public_tcbinfo", "secure_time")
LIBRARY_CASES = [
    ("lib", "services: {a: {}}\n", {
        "kms_enabled": False, "swap_size": "2G", "storage_fs": None, "init_script": ["a", "b"],
        "docker_config": {"\uffff": 1, "\U0001F600": [1, None, "\u00f6"], "a": {"b": True}, "Z": "", "\u00e9": -3}}),
    ("lib2", "services:\r\n  web: {}\r\n", {
        "kms_enabled": False, "local_key_provider_enabled": True, "manifest_version": "3",
        "port_policy": {"allow": [80, 443]}, "event_log_version": 2}),
]
BAD_CASES = [
    ("bad/name", {}),
    ("ok", {"allowed_envs": ["1A"]}),
    ("ok", {"allowed_envs": ["A", "A"]}),
    ("ok", {"allowed_envs": ["it's \u00e9\\\n"]}),
    ("ok", {"key_provider": "tpmx'\""}),
    ("ok", {"key_provider": "local", "kms_enabled": True}),
    ("ok", {"runner": "bash"}),
    ("ok", {"manifest_version": 3}),
    ("ok", {"storage_fs": "btrfs"}),
    ("ok", {"swap_size": "2 parsecs"}),
    ("ok", {"public_logs": "yes"}),
    ("ok", {"no_such_field": 1}),
]


def _fill_form(page, name, text, allowed, provider, checked):
    """Fill the deploy form; returns the app-compose booleans it set."""
    fields = {option: checked.get(option, option in DEFAULT_ON) for option in OPTIONS}
    page.set_value("#app-name", name)
    page.set_value("#compose-text", text)
    page.set_value("#allowed-envs", ", ".join(allowed))
    page.set_value("#key-provider", provider)
    for option, on in fields.items():
        page.check(f"#opt-{option}", on)
    return fields


def test_the_pages_app_compose_and_signature_checks_match_python(short_tmp, stack, ui_url, browser):
    kms, _vmm = stack
    page = Page(browser, ui_url)
    _login(page)

    # The deploy form, filled in, makes the bytes render(build(...)) makes.
    for name, text, allowed, provider, checked in FORM_CASES:
        fields = _fill_form(page, name, text, allowed, provider, checked)
        got = page.prepared()
        want = compose.render(compose.build(text, name, allowed_envs=allowed, key_provider=provider, **fields))
        assert got.get("hex") == want.hex(), (name, got, want)
        assert got["hash"] == compose.compose_hash(want) and got["app_id"] == compose.app_id_for(got["hash"])

    # An uploaded file is used byte for byte (CRLF line ends and a BOM kept), as the module reads it.
    upload = short_tmp / "crlf-compose.yaml"
    upload.write_bytes("\ufeffservices:\r\n  web:\r\n    image: busybox\r\n".encode())
    fields = _fill_form(page, "crlf", "", ["GREETING"], "kms", {})
    page.find("#compose-upload").send_keys(str(upload))
    page.wait("the upload", lambda: "CR line ends" in (page.text("#compose-upload-note") or ""))
    want = compose.render(compose.build(upload.read_bytes().decode(), "crlf", allowed_envs=["GREETING"], key_provider="kms",
                                        **fields))
    assert page.prepared()["hex"] == want.hex()
    page.find("#preview-button").click()
    page.wait("the preview", lambda: page.text("#compose-hash") == compose.compose_hash(want))
    page.shot("00-preview")

    # The library itself, with options the form does not offer: nested unicode keys sort by code
    # point, nested nulls stay, top-level nulls go.
    for name, text, options in LIBRARY_CASES:
        got = page.js("const u = window.dstackVmmUi;"
                      "return u.toHex(u.renderAppCompose(u.buildAppCompose(arguments[0], arguments[1], arguments[2])));",
                      text, name, options)
        assert got == compose.render(compose.build(text, name, **options)).hex(), name
    # Bad input is refused with Python's message.
    for name, options in BAD_CASES:
        with pytest.raises(DstackError) as err:
            compose.build("services: {a: {}}\n", name, **options)
        want = str(err.value)
        got = page.js("try { window.dstackVmmUi.buildAppCompose('services: {a: {}}\\n', arguments[0], arguments[1]); }"
                      "catch (e) { return e.message; }", name, options)
        assert got == want, (name, options)
    odd = {"b": None, "a": {"z": None, "y": [None, True, "\u2029\u0001\u001f\b\f\x7f\u00a0<>&'"]}, "name": "x"}
    assert page.js("const u = window.dstackVmmUi; return u.toHex(u.renderAppCompose(arguments[0]));",
                   odd) == compose.render(odd).hex()

    # The KMS signature check, on answers the real KMS keys make: fresh passes, stale, tampered,
    # or another KMS's key fails, each with its reason.
    keys = root_keys.load(str(kms.state_dir))
    pinned = keys.k256_pubkey.hex()
    app_id = "ab" * 20
    verify = ("try { const r = window.dstackVmmUi.verifyEnvPubkey(arguments[0], arguments[1], arguments[2]);"
              "      return 'ok ' + window.dstackVmmUi.toHex(r.publicKey); } catch (e) { return e.message; }")
    fresh = keys.env_pubkey_response(app_id)
    assert page.js(verify, fresh, app_id, pinned) == "ok " + fresh["public_key"]
    uncompressed = kdf.k256_public_key(keys.k256_key, compressed=False).hex()
    assert page.js(verify, fresh, app_id, uncompressed).startswith("ok ")
    stale = keys.env_pubkey_response(app_id, now=time.time() - 400)
    assert page.js(verify, stale, app_id, pinned).startswith("timestamp: is stale: the signature is 40")
    future = keys.env_pubkey_response(app_id, now=time.time() + 120)
    assert "in the future" in page.js(verify, future, app_id, pinned)
    swapped = dict(fresh, public_key=keys.env_pubkey_response("cd" * 20)["public_key"])
    assert "was not made by the pinned KMS key" in page.js(verify, swapped, app_id, pinned)
    other_kms = kdf.k256_public_key(os.urandom(32)).hex()
    assert "was not made by the pinned KMS key" in page.js(verify, fresh, app_id, other_kms)
    assert "is missing" in page.js(verify, dict(fresh, signature_v1=""), app_id, pinned)
    assert page.js(verify, fresh, "ab" * 19, pinned).startswith("app_id: must be 20 bytes")

    # What the browser encrypts, the guest's decryption reads back (the legacy Python path).
    from ansible_collections.dstack.tee.plugins.module_utils import env_crypt  # pylint: disable=import-outside-toplevel
    sealed = browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; const u = window.dstackVmmUi;"
        "u.encryptEnv(u.parseDotenv(arguments[0]), arguments[1]).then(b => done(u.toHex(b)), e => done(e.message));",
        'A="multi\\nline \u00e9"\nexport B=\'lit\\n\' # c\nC=x #comment\n', fresh["public_key"])
    secret = kdf.env_crypt_key(keys.ca_key, app_id)
    assert env_crypt.decrypt_env(bytes.fromhex(sealed), secret) == [("A", "multi\nline \u00e9"), ("B", "lit\\n"), ("C", "x")]
    assert _console_problems(page, secrets=()) == []


def _console_problems(page, secrets):
    """Console lines that are errors (other than the expected 401s) or that show a secret."""
    problems = []
    for line in page.console():
        if any(secret in line for secret in secrets):
            problems.append("a secret in the console: " + line[:80])
        elif "Failed to load resource" not in line:  # HTTP errors: the page shows them itself
            problems.append(line)
    return problems


# ---- the whole flow, through the page ------------------------------------------------------------

@needs_podman
def test_deploy_watch_logs_stop_remove_through_the_page(short_tmp, stack, ui_url, busybox_image, browser):
    kms, vmm = stack
    tmp_path = short_tmp
    text = COMPOSE
    expected = compose.render(compose.build(text, "ui-test", allowed_envs=["GREETING"]))
    chash, app_id = _allow(kms, expected)
    (tmp_path / "docker-compose.yaml").write_text(text)
    port = free_port()
    page = Page(browser, ui_url)

    # The token: asked for on the first 401, refused when wrong, kept for the tab when right.
    page.open()
    page.wait("the token prompt", lambda: page.visible("#token-panel"))
    page.shot("01-token")
    page.type("#token-input", "wrong-token")
    page.find("#token-submit").click()
    page.wait("the refusal", lambda: "refused" in page.text("#token-why") and page.visible("#token-panel"))
    page.type("#token-input", TOKEN)
    page.find("#token-submit").click()
    page.wait("the VM list", lambda: page.js("return document.body.dataset.ready === '1'"))
    assert page.visible("#vm-empty") and not page.visible("#token-panel")
    # The VMM names its KMS's k256 key (GetMeta kms.k256_pubkey): the field is prefilled, and says so.
    kms_pubkey = kms.client().get_meta()["k256_pubkey"]
    page.wait("the KMS key from GetMeta", lambda: page.find("#kms-pubkey").get_attribute("value") == kms_pubkey)
    assert "filled from this VMM's GetMeta" in page.text("#kms-pubkey-note")
    page.shot("02-no-vms")

    # The form: the compose uploaded, env values typed (one not allowed); first with another KMS's
    # key pinned: the page refuses the env key and creates nothing.
    page.type("#app-name", "ui-test")
    page.find("#compose-upload").send_keys(str(tmp_path / "docker-compose.yaml"))
    page.type("#allowed-envs", "GREETING")
    page.type("#ports", f"{port}:8080")
    page.type("#env-text", f"GREETING={GREETING}\nNOT_DECLARED=dropped")
    page.type("#kms-pubkey", kdf.k256_public_key(os.urandom(32)).hex())
    page.shot("03-form")
    page.find("#deploy-button").click()
    failed = page.wait("the refusal", lambda: page.text("#deploy-steps li.failed"))
    assert "signature_v1: was not made by the pinned KMS key" in failed
    assert page.text("#compose-hash") == chash and page.text("#app-id-out") == app_id
    assert vmm.client().call("Status")["vms"] == []
    page.shot("04-wrong-kms-key-refused")

    page.type("#kms-pubkey", kms_pubkey)
    page.find("#deploy-button").click()
    created = page.wait("CreateVm", lambda: page.text("#deploy-steps") if page.finds("#deploy-steps li.failed")
                        or "CreateVm: VM" in page.text("#deploy-steps") else None)
    assert "CreateVm: VM" in created, created
    steps = [li.text for li in page.finds("#deploy-steps li")]
    assert any("Not in allowed envs, so not encrypted: NOT_DECLARED" in s for s in steps)
    assert any(s.startswith("KMS signature checked: signature_v1 by the pinned key") for s in steps)
    assert page.find("#env-text").get_attribute("value") == ""
    page.shot("05-deployed")

    vm = vmm.client().call("Status")["vms"][0]
    row = page.row(vm["id"])
    assert vm["compose_hash"] == chash and vm["app_id"] == app_id
    page.wait("the VM row", lambda: page.finds(row))
    page.wait("the boot", lambda: page.text(f"{row} .vm-boot") == "running" or "error" in page.find(f"{row} .vm-boot").get_attribute("class"),
              timeout=120)
    assert page.text(f"{row} .vm-status") == "running" and page.text(f"{row} .vm-boot") == "running"
    assert page.text(f"{row} .vm-app-id") == app_id and len(page.text(f"{row} .vm-instance-id")) == 40
    page.shot("06-running")

    # The app answers on its port with the env it decrypted in the CVM, and only the allowed one.
    assert _get(f"http://127.0.0.1:{port}/").strip() == GREETING
    served_env = _get(f"http://127.0.0.1:{port}/env.txt")
    assert f"GREETING={GREETING}" in served_env and "NOT_DECLARED" not in served_env

    # Logs: the app's container's own output, on stdout (the default channel), each line named by
    # its service's container as docker compose names it; the guest agent's own log on stderr.
    page.find(f"{row} .vm-logs").click()
    page.wait("the logs", lambda: page.js("return document.getElementById('logs-text').dataset.loaded"))
    assert page.text("#logs-name") == "ui-test" and page.find("#logs-channel").get_attribute("value") == "stdout"
    page.wait("the container's line", lambda: "web-1  | web is up, serving its greeting\n" in page.text("#logs-text"))
    # Its requests come in as they are made: the page refreshes every 2 s.
    _get(f"http://127.0.0.1:{port}/env.txt")
    page.wait("the container's later line", lambda: re.search(r"^web-1  \| .*url:/env\.txt$", page.text("#logs-text"), re.M))
    assert [o.get_attribute("value") for o in page.finds("#logs-service option")] == ["", "web"]
    page.set_value("#logs-service", "web")
    page.wait("one service's lines", lambda: page.js("return document.getElementById('logs-text').dataset.loaded")
              and all(line.startswith("web-1  | ") for line in page.text("#logs-text").splitlines()))
    assert "web-1  | web is up, serving its greeting" in page.text("#logs-text")
    assert GREETING not in page.text("#logs-text")  # the app did not print it: the logs do not either
    page.shot("07-container-logs")
    page.set_value("#logs-channel", "stderr")
    assert page.find("#logs-service").get_attribute("disabled") is not None
    stderr_log = (tmp_path / "run" / vm["id"] / "stderr.log").read_text()
    first_line = stderr_log.splitlines()[0]
    page.wait("the stderr log", lambda: first_line in page.text("#logs-text"))
    assert GREETING not in page.text("#logs-text") and "web-1  |" not in page.text("#logs-text")
    page.shot("08-agent-logs")

    # Stop: the status changes, the app stops answering.
    page.find(f"{row} .vm-stop").click()
    # (The process backend's stop takes about 40 s today: see the guest agent's SIGTERM path.)
    page.wait("the stop", lambda: page.text(f"{row} .vm-status") in ("stopped", "exited"), timeout=90)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)  # pylint: disable=consider-using-with
    assert page.find(f"{row} .vm-start").is_enabled() and not page.find(f"{row} .vm-stop").is_enabled()
    page.shot("09-stopped")

    # Remove, after a confirming second click: the row goes, and so does the VM.
    page.find(f"{row} .vm-remove").click()
    assert page.find(f"{row} .vm-remove").text == "Confirm remove"
    page.shot("10-confirm-remove")
    page.find(f"{row} .vm-remove").click()
    page.wait("the removal", lambda: not page.finds(row) and page.visible("#vm-empty"))
    assert vmm.client().call("Status")["vms"] == [] and not (tmp_path / "run" / vm["id"]).exists()
    assert not page.visible("#logs-panel")
    page.shot("11-removed")

    assert _console_problems(page, secrets=(GREETING, "dropped", TOKEN)) == []


def test_vendored_files_are_the_published_ones():
    """vendor/SHA256SUMS pins the npm files; the page loads nothing from outside the VMM."""
    vendor = STATIC / "vendor"
    for line in (vendor / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    listed = {line.split("  ", 1)[1] for line in (vendor / "SHA256SUMS").read_text().splitlines()}
    assert listed == {str(p.relative_to(vendor)) for p in vendor.rglob("*.js")}
    for path in [STATIC / "index.html", *STATIC.glob("*.js"), *vendor.rglob("*.js")]:
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//|\bfrom\s*["'](https?:)?//|\bimport\(["'](https?:)?//""", text), path
    for path in (STATIC / "app.js", STATIC / "dstack.js"):
        assert "console." not in path.read_text(), path
