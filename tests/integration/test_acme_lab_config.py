"""dstack.tee.acme_lab_config as Ansible runs it: check mode, apply, check mode again, apply again;
the files it writes run a real BIND9 and a real Pebble (the demo's ACME world, dstack.tee.acme_lab):
named answers for the zone and takes an update signed with the credentials it wrote, Pebble
serves its directory under the listener CA it made; secrets are 0600 and in no output; bad
settings are refused naming the option, before anything is written.
"""

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request

import pytest

from conftest import free_port, run_module
from dns_fixtures import NAMED, free_port as free_tcp_udp_port, needs_bind
from ansible_collections.dstack.tee.plugins.module_utils import acme_lab

ZONE = "lab.localhost"


def _args(folder, ports, **extra):
    return dict({"path": str(folder), "zone": ZONE, "dns_listen": f"127.0.0.1:{ports['dns']}",
                 "pebble_listen": f"127.0.0.1:{ports['acme']}",
                 "pebble_management_listen": f"127.0.0.1:{ports['management']}"}, **extra)


@pytest.fixture
def lab(short_tmp):
    ports = {"dns": free_tcp_udp_port(), "acme": free_port(), "management": free_port()}
    procs = []
    yield short_tmp / "lab", ports, procs
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _start(procs, argv, env=None, cwd=None):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=cwd)  # pylint: disable=consider-using-with
    procs.append(proc)
    return proc


def _wait(check, proc, what, timeout=20, explain=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} did not answer in {timeout} s {explain()}")


def _dig(ports, name, rdtype, short=True):
    answer = subprocess.run(["dig", "+short" if short else "+noshort", "+time=2", "+tries=1", "@127.0.0.1", "-p",
                             str(ports["dns"]), rdtype, name], capture_output=True, text=True, timeout=30, check=False)
    return answer.stdout.split("\n")[:-1]


@needs_bind
@pytest.mark.skipif(not shutil.which("pebble"), reason="pebble is installed by scripts/setup.sh")
def test_check_apply_idempotent_and_the_files_run_bind9_and_pebble(lab):
    folder, ports, procs = lab
    preview = run_module("acme_lab_config", _args(folder, ports), check=True, diff=True)
    assert preview["changed"] and not folder.exists(), preview.raw
    applied = run_module("acme_lab_config", _args(folder, ports), diff=True)
    assert applied["changed"] and applied["named_changed"] and applied["pebble_changed"], applied.raw
    files = applied["files"]
    secret = acme_lab.tsig_secret((folder / "bind" / "tsig.key").read_text())
    assert secret and secret not in applied.raw and secret not in preview.raw
    assert "<hidden, changed>" in applied["diff"]["after"] and "listen-on port" in applied["diff"]["after"]
    for name in ("tsig_key", "listener_key", "credentials"):
        assert os.stat(files[name]).st_mode & 0o777 == 0o600, name
    assert run_module("acme_lab_config", _args(folder, ports), check=True)["changed"] is False
    again = run_module("acme_lab_config", _args(folder, ports))
    assert again["changed"] is False and not again["named_changed"] and not again["pebble_changed"], again.raw

    # The files run: named answers for the zone (every name at 127.0.0.1) and takes an update signed
    # with the credentials written for certbot; Pebble serves its directory under the listener CA.
    named = _start(procs, [NAMED, "-g", "-c", files["named_conf"]])
    _wait(lambda: _dig(ports, ZONE, "SOA"), named, "named")
    # Once named answers for the zone, its wildcard answers too; a CI run (load > 2 cores) once saw
    # one empty answer right after the SOA, so a few tries, and the whole answer if they all fail.
    _wait(lambda: _dig(ports, f"x.{ZONE}", "A") == ["127.0.0.1"], named, "the wildcard answer", timeout=10,
          explain=lambda: _dig(ports, f"x.{ZONE}", "A", short=False))
    values = dict(line.split(" = ", 1) for line in open(files["credentials"], encoding="ascii").read().splitlines())
    assert values["dns_rfc2136_port"] == str(ports["dns"]) and values["dns_rfc2136_algorithm"] == "HMAC-SHA256"
    key = f"hmac-sha256:{values['dns_rfc2136_name']}:{values['dns_rfc2136_secret']}"
    done = subprocess.run(["nsupdate", "-y", key], input=f"server 127.0.0.1 {ports['dns']}\n"
                          f'update add {ZONE}. 60 CAA 0 issue "pebble"\nsend\n', capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert _dig(ports, ZONE, "CAA") == ['0 issue "pebble"']
    pebble = _start(procs, [shutil.which("pebble"), "-config", files["pebble_config"], "-dnsserver",
                            applied["dns_server"]], env=dict(os.environ, **applied["pebble_environment"]))
    context = ssl.create_default_context(cafile=files["ca_bundle"])

    def directory():
        with urllib.request.urlopen(applied["directory_url"], context=context, timeout=2) as answer:
            return "newAccount" in json.loads(answer.read())
    _wait(directory, pebble, "pebble")

    # named keeps the records it was sent: a later run leaves the zone file (and its journal) alone.
    assert run_module("acme_lab_config", _args(folder, ports))["changed"] is False
    assert _dig(ports, ZONE, "CAA") == ['0 issue "pebble"']


def test_bad_settings_are_named_and_nothing_is_written(short_tmp):
    folder = short_tmp / "lab"
    ports = {"dns": 8053, "acme": 14000, "management": 15000}
    for extra, field, reason in (({"dns_listen": "localhost:53"}, "dns_listen", "must be IP:PORT"),
                                 ({"pebble_listen": "127.0.0.1:0"}, "pebble_listen", "not between 1 and 65535"),
                                 ({"zone": 'evil"; };'}, "zone", "must be a DNS name"),
                                 ({"tsig_name": "a b"}, "tsig_name", "must be a DNS name")):
        result = run_module("acme_lab_config", _args(folder, ports, **extra))
        assert result.get("failed") and result["field"] == field and reason in result["msg"], result.raw
        assert not folder.exists()
