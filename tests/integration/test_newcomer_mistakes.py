"""deploy-app.yml as a newcomer meets it: a clean default run, and each first mistake refused before
anything changes.

One stack for the module (site.yml on the simulated default, with its gateway, in a short temporary
root with its own ports, interface and namespace names) and the sample app deployed on it. Then:
the default run's output has no [WARNING], no template error (`<< error`), no task name with an
empty value, and its summary lines are whole (a block of lines, nothing cut mid-word); a bad
secrets file, a compose file that is not YAML or has no services, a missing app_dir, a relative
one (taken from where the command runs), a host port another program holds, and a KMS URL that
nothing answers or that is http:// each stop the run with a message naming the file (and line)
and the fix, and leave the KMS allowlist, the build folder and the VMM's CVMs exactly as they were.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, VENV_BIN, free_port, needs_podman, run_playbook
from dns_fixtures import free_port as free_tcp_udp_port
from test_demo_playbook import TOKEN, _free_udp_port, _teardown, _vmm
from ansible_collections.dstack.tee.plugins.module_utils import wireguard

DEPLOY = ROOT / "playbooks" / "deploy-app.yml"
# The summary's labels, in order (roles/app's "Show the deployed app").
SUMMARY = ("app", "url", "via the gateway", "instances", "host port", "try it", "compose_hash", "app_id", "authorized in",
           "secrets", "instance_id", "quote", "mr_aggregated", "app answered")


@pytest.fixture(scope="module")
def stack():
    """site.yml's KMS, gateway and VMM in a temporary root, the sample image, and examples/hello
    deployed (its output kept: the default path)."""
    root = Path(tempfile.mkdtemp(prefix="dn-", dir="/tmp"))
    ports = {"kms": free_port(), "vmm": free_port(), "app": free_port(), "rpc": free_port(), "admin": free_port(),
             "proxy": free_port(), "wg": _free_udp_port(), "acme": free_port(), "acme_management": free_port(),
             "dns": free_tcp_udp_port()}
    netns = f"dstack-test-nm-{os.getpid()}"
    extra = ["-e", json.dumps({
        "dstack_root": str(root), "dstack_kms_listen": f"127.0.0.1:{ports['kms']}",
        "dstack_kms_url": f"https://127.0.0.1:{ports['kms']}", "dstack_vmm_listen": f"127.0.0.1:{ports['vmm']}",
        "dstack_vmm_url": f"http://127.0.0.1:{ports['vmm']}", "dstack_vmm_tokens": [TOKEN],
        "dstack_gateway_rpc_listen": f"127.0.0.1:{ports['rpc']}", "dstack_gateway_admin_listen": f"127.0.0.1:{ports['admin']}",
        "dstack_gateway_proxy_listen_addr": "127.0.0.1", "dstack_gateway_proxy_listen_port": ports["proxy"],
        "dstack_gateway_wg_listen_port": ports["wg"], "dstack_gateway_wg_interface": f"dnm{os.getpid() % 100000}",
        "dstack_gateway_wg_netns": netns,
        # The local ACME server and DNS (roles/acme_lab) on ports of their own: a running demo keeps its.
        "dstack_acme_lab_pebble_listen": f"127.0.0.1:{ports['acme']}",
        "dstack_acme_lab_pebble_management_listen": f"127.0.0.1:{ports['acme_management']}",
        "dstack_acme_lab_dns_listen": f"127.0.0.1:{ports['dns']}"})]
    try:
        site = run_playbook(ROOT / "playbooks" / "site.yml", *extra)
        assert site.returncode == 0, site.stdout[-4000:] + site.stderr[-2000:]
        image = subprocess.run([str(ROOT / "examples" / "hello" / "image" / "build.sh"), "localhost/dstack-hello:latest"],
                               capture_output=True, text=True, check=False)
        assert image.returncode == 0, image.stderr
        hello = _app(root, "hello", ports["app"])
        first = run_playbook(DEPLOY, *extra, "-e", f"app_dir={hello}")
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        yield dict(root=root, ports=ports, extra=extra, hello=hello, first=first, site=site)
    finally:
        _teardown(root, ports)
        wireguard.netns_remove(netns)
        shutil.rmtree(root, ignore_errors=True)


def _app(root, name, host_port):
    """A copy of examples/hello named `name` (app.yml) with its page on `host_port`."""
    app = root / "apps" / name
    shutil.copytree(ROOT / "examples" / "hello", app, ignore=shutil.ignore_patterns("image"), dirs_exist_ok=True)
    spec = (app / "app.yml").read_text().replace("name: hello", f"name: {name}")
    (app / "app.yml").write_text(spec.replace("host_port: 8080", f"host_port: {host_port}"))
    return app


def _state(stack):
    """What a deployment changes: the KMS allowlist, every file of the build folder, the VMM's CVMs."""
    root = stack["root"]
    build = root / "build"
    files = {str(p.relative_to(build)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
             for p in sorted(build.rglob("*"))}
    cvms = [(vm["id"], vm["name"], vm["app_id"], vm["compose_hash"], vm["encrypted_env_sha256"],
             json.dumps(vm["configuration"]["ports"], sort_keys=True))
            for vm in _vmm(stack["ports"], "Status", {"brief": False})["vms"]]
    return (root / "kms" / "auth-config.json").read_text(), files, cvms


def _error(result):
    """The message the run stopped with (Ansible's one-line "[ERROR]: Task failed: ..." form)."""
    assert result.returncode != 0, result.stdout[-3000:]
    match = re.search(r"^\[ERROR\]: Task failed: (?:Action failed: |Module failed: )?(.*)$", result.stdout, re.M)
    assert match, result.stdout[-3000:]
    return match.group(1)


def _refused(stack, *args, cwd=None):
    """Run deploy-app.yml expecting a refusal that changes nothing; return its message."""
    before = _state(stack)
    if cwd is None:
        result = run_playbook(DEPLOY, *stack["extra"], *args)
    else:  # as run_playbook, from another directory
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                   PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
        result = subprocess.run([str(VENV_BIN / "ansible-playbook"), str(DEPLOY), *stack["extra"],
                                 *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600, check=False)
    message = _error(result)
    assert _state(stack) == before, message
    return message


@needs_podman
def test_a_default_run_is_clean(stack):
    """No [WARNING], no template error, no task name with an empty value, whole summary lines."""
    # site.yml, the first part of make demo, warns of nothing either.
    site = stack["site"].stdout + stack["site"].stderr
    for output in (site, stack["first"].stdout + stack["first"].stderr,
                   _check_mode_run(stack)):
        assert "[WARNING]" not in output and "<< error" not in output and "[DEPRECATION" not in output, output[-3000:]
        for name in re.findall(r"^TASK \[(.*)\] \**$", output, re.M):
            assert not re.search(r"(\s$|\s{2}|\(\s*\)|''|:$|\bfor\s*$|\bat\s*$)", name), name
    lines = _summary(stack["first"].stdout)
    assert lines["secrets"] == "encrypted (GREETING, API_TOKEN); not in allowed_envs, so left out: NOT_DECLARED"
    assert lines["via the gateway"].startswith("answered; checked from outside") and \
        re.fullmatch(r"all \d+ checks passed", lines["via the gateway"].rsplit(": ", 1)[1])
    assert lines["try it"].startswith("curl --cacert ") and lines["try it"].endswith(f"{stack['ports']['proxy']}/")
    assert lines["app answered"] == "HTTP 200 OK (through the gateway)"


def _check_mode_run(stack):
    check = run_playbook(DEPLOY, *stack["extra"], "-e", f"app_dir={stack['hello']}", "--check", "--diff")
    assert check.returncode == 0, check.stdout[-3000:]
    lines = _summary(check.stdout)
    # Check mode says what it did not check, instead of an empty value or a claim.
    for label in ("via the gateway", "quote", "mr_aggregated", "app answered"):
        assert lines[label] == "(not checked in check mode)", (label, lines[label])
    return check.stdout + check.stderr


def _summary(output):
    """The summary's lines by label: one block, each line whole (a list's items would be folded)."""
    block = re.search(r"^    msg: \|-\n((?:        .*\n)+)", output[output.rindex("Show the deployed app"):], re.M)
    assert block, output[-3000:]
    lines = [line[8:] for line in block.group(1).splitlines()]
    labels = [line.split(":", 1)[0] for line in lines]
    assert tuple(labels) == SUMMARY, lines
    values = {label: line.split(":", 1)[1].strip() for label, line in zip(labels, lines)}
    assert all(values.values()), values
    return values


@needs_podman
def test_without_the_gateway_the_app_answer_is_cut_at_a_word(stack):
    """The app's first answer on its host port, shortened at a whole word, never mid-word."""
    port = free_port()
    plain = _app(stack["root"], "plain", port)
    result = run_playbook(DEPLOY, *stack["extra"], "-e", f"app_dir={plain}", "-e", "dstack_app_gateway=false")
    assert result.returncode == 0, result.stdout[-3000:]
    answered = _summary(result.stdout)["app answered"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        words = re.sub(r"<[^>]*>", " ", response.read().decode()).split()
    shown = answered.removesuffix("...").split()
    assert len(answered) <= 165 and shown == words[:len(shown)], (answered, words[:40])


@needs_podman
def test_a_bad_secrets_file_is_named_with_its_line(stack):
    app = _app(stack["root"], "badsecrets", free_port())
    (app / "secrets.env").write_text("# mine\nGREETING=\"Hello from a confidential VM\nAPI_TOKEN=t0ken-value\n")
    message = _refused(stack, "-e", f"app_dir={app}")
    assert message == f"{app}/secrets.env line 2: the value of GREETING has no closing \"", message
    assert "t0ken-value" not in message


@needs_podman
@pytest.mark.parametrize("compose, reason", [
    ("services:\n  web:\n    image: localhost/dstack-hello:latest\n   ports: ['80:80']\n",
     "docker-compose.yaml: is not valid YAML at line 4, column 4"),
    ("service:\n  web:\n    image: localhost/dstack-hello:latest\n",
     "docker-compose.yaml: has no `services` mapping: a docker-compose file needs at least one service"),
])
def test_a_bad_compose_file_is_named(stack, compose, reason):
    app = _app(stack["root"], "badcompose", free_port())
    (app / "docker-compose.yaml").write_text(compose)
    assert f"{app}/{reason}" in _refused(stack, "-e", f"app_dir={app}")


@needs_podman
def test_a_missing_app_dir_names_the_option(stack):
    message = _refused(stack)
    assert message.startswith("app_dir: is required") and "-e app_dir=DIR" in message, message


@needs_podman
@pytest.mark.parametrize("settings, message", [
    ({"dstack_app_auth": "contract", "dstack_app_eth_chain_id": 1},
     "dstack_app_eth_rpc_url: is required with dstack_app_auth=contract, an http:// or https:// JSON-RPC URL (got '')"),
    ({"dstack_app_auth": "contract", "dstack_app_eth_rpc_url": "http://127.0.0.1:1", "dstack_app_eth_chain_id": 0},
     "dstack_app_eth_chain_id: is required with dstack_app_auth=contract, the chain id the RPC serves (got '0')"),
    ({"dstack_app_contract_address": "0x12"}, "dstack_app_contract_address: must be a DstackApp address"),
    ({"revoke_old": True, "dstack_app_auth": "contract", "dstack_app_eth_rpc_url": "http://127.0.0.1:1",
      "dstack_app_eth_chain_id": 1}, "revoke_old: works with dstack_app_auth=local only"),
])
def test_a_bad_setting_is_named_before_anything_is_made(stack, settings, message):
    app = _app(stack["root"], "badsetting", free_port())
    assert _refused(stack, "-e", f"app_dir={app}", "-e", json.dumps(settings)).startswith(message)


@needs_podman
def test_a_relative_app_dir_is_taken_from_where_the_command_runs(stack, tmp_path):
    # Missing: the error shows the absolute path, from the command's directory (not the playbook's).
    message = _refused(stack, "-e", "app_dir=no-such-app", cwd=tmp_path)
    assert message.startswith(f"app_dir: {tmp_path}/no-such-app does not exist;") and "-e app_dir=DIR" in message, message
    # There: a relative path from the command's directory is the app (check mode: nothing made).
    app = _app(stack["root"], "relative", free_port())
    before = _state(stack)
    preview = run_playbook(DEPLOY, *stack["extra"], "-e", f"app_dir={os.path.relpath(app, ROOT)}", "--check")
    assert preview.returncode == 0 and _summary(preview.stdout)["app"] == "relative", preview.stdout[-3000:]
    assert _state(stack) == before


@needs_podman
def test_a_host_port_another_program_holds_names_that_program(stack):
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                               f"s.bind(('127.0.0.1', {port})); s.listen(); print('ready', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        app = _app(stack["root"], "busyport", port)
        message = _refused(stack, "-e", f"app_dir={app}")
        assert message.startswith(f"{app}/app.yml: ports: host port {port}/tcp on 127.0.0.1 is in use by another "
                                  f"program, pid {holder.pid} ({sys.executable} -c import socket"), message
        assert message.endswith("stop it, or choose another host_port"), message
    finally:
        holder.kill()
        holder.wait()
    # A host port another CVM holds names that CVM.
    taken = _app(stack["root"], "takenport", stack["ports"]["app"])
    assert _refused(stack, "-e", f"app_dir={taken}") == \
        f"{taken}/app.yml: ports: host port {stack['ports']['app']}/tcp is held by the CVM 'hello' on the VMM: " \
        "choose another host_port"


@needs_podman
def test_a_wrong_kms_url_asks_whether_the_kms_runs(stack):
    app = _app(stack["root"], "wrongkms", free_port())
    nothing = f"https://127.0.0.1:{free_port()}"
    message = _refused(stack, "-e", f"app_dir={app}", "-e", f"dstack_app_kms_url={nothing}")
    assert message.startswith(f"kms_url: cannot reach the KMS at {nothing}: Connection refused; is the KMS running? "
                              "The URL must be https"), message
    plain = f"http://127.0.0.1:{stack['ports']['kms']}"
    message = _refused(stack, "-e", f"app_dir={app}", "-e", f"dstack_app_kms_url={plain}")
    assert message.startswith(f"kms_url: must be an https:// URL, not '{plain}': the KMS serves HTTPS only; "
                              "is the KMS running? The URL must be https"), message
    # A VMM that does not answer, or refuses the token, is named too.
    assert "is the VMM running?" in _refused(stack, "-e", f"app_dir={app}", "-e", f"dstack_app_vmm_url=http://127.0.0.1:{free_port()}")
    assert _refused(stack, "-e", f"app_dir={app}", "-e", "dstack_app_vmm_token=wrong").startswith("vmm_token: the VMM at ")


@needs_podman
def test_a_check_mode_diff_shows_a_compose_change_as_yaml_lines(stack):
    hello = stack["hello"]
    changed = stack["root"] / "apps" / "hello-v2"
    shutil.copytree(hello, changed)
    compose = (hello / "docker-compose.yaml").read_text()
    (changed / "docker-compose.yaml").write_text(compose.replace("restart: unless-stopped", "restart: always"))
    before = _state(stack)
    preview = run_playbook(DEPLOY, *stack["extra"], "-e", f"app_dir={changed}", "--check", "--diff")
    assert preview.returncode == 0, preview.stdout[-3000:]
    assert _state(stack) == before
    diff = preview.stdout[preview.stdout.index("--- before: app-compose of the CVM hello"):]
    diff = diff[:diff.index("\n\n")]
    changes = [line for line in diff.splitlines()[2:] if line[:1] in "+-"]
    assert changes == ["-      restart: unless-stopped", "+      restart: always"], diff
