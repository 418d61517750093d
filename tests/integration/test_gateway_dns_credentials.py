"""roles/gateway's DNS provider credentials (dstack_gateway_certbot_credentials, from ansible-vault in
practice): tasks/dns_credentials.yml run by ansible-playbook through include_role, as main.yml
imports it. The file certbot's DNS plugin reads is written with the INI keys, 0600; the secret is
in no output, diff or check-mode run; a second run changes nothing; a key or value that would
smuggle another INI line is refused naming the variable, and nothing is written."""

import json
import os
import stat

from conftest import ROOT, run_playbook

SECRET = "c2VjcmV0LXRzaWcta2V5LW9mLXRoZS16b25l"
CREDENTIALS = {"dns_rfc2136_server": "10.53.0.2", "dns_rfc2136_port": 53, "dns_rfc2136_name": "acme-key.",
               "dns_rfc2136_secret": SECRET, "dns_rfc2136_algorithm": "HMAC-SHA256"}


def _run(folder, credentials, *flags):
    playbook = folder / "credentials.yml"
    playbook.write_text("""
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: dstack.tee.gateway
        tasks_from: dns_credentials
""")
    variables = {"dstack_gateway_state_dir": str(folder / "state"), "dstack_gateway_certbot_enabled": True,
                 "dstack_gateway_certbot_credentials": credentials}
    return run_playbook(playbook, "-i", str(ROOT / "playbooks" / "localhost.yml"), "-v", "--diff",
                        "-e", json.dumps(variables), *flags)


def _changed(done):
    recap = [line for line in done.stdout.splitlines() if line.startswith("localhost")][-1]
    return int(recap.split("changed=")[1].split()[0])


def test_the_credentials_file_is_written_0600_idempotent_and_never_shown(tmp_path):
    (tmp_path / "state").mkdir()
    ini = tmp_path / "state" / "dns-credentials.ini"
    first = _run(tmp_path, CREDENTIALS)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _changed(first) == 1
    assert ini.read_text() == ("dns_rfc2136_algorithm = HMAC-SHA256\ndns_rfc2136_name = acme-key.\n"
                               "dns_rfc2136_port = 53\ndns_rfc2136_secret = " + SECRET + "\n"
                               "dns_rfc2136_server = 10.53.0.2\n")
    assert stat.S_IMODE(os.stat(ini).st_mode) == 0o600
    again = _run(tmp_path, CREDENTIALS)
    assert again.returncode == 0 and _changed(again) == 0, again.stdout
    # A new secret in check mode: reported as a change, the file untouched.
    rotated = dict(CREDENTIALS, dns_rfc2136_secret="bmV3LXNlY3JldC1mb3ItdGhlLXpvbmU=")
    checked = _run(tmp_path, rotated, "--check")
    assert checked.returncode == 0 and _changed(checked) == 1, checked.stdout
    assert SECRET in ini.read_text()
    for done in (first, again, checked):
        assert SECRET not in done.stdout + done.stderr
        assert "bmV3LXNlY3JldC1mb3ItdGhlLXpvbmU=" not in done.stdout + done.stderr


def test_a_value_or_key_that_would_add_an_ini_line_is_refused_and_nothing_written(tmp_path):
    (tmp_path / "state").mkdir()
    for credentials in ({"dns_rfc2136_secret": SECRET + "\ndns_rfc2136_server = 203.0.113.9"},
                        {"dns_rfc2136_server = 203.0.113.9\ndns_rfc2136_secret": SECRET},
                        {"Bad Key": SECRET}):
        done = _run(tmp_path, credentials)
        assert done.returncode != 0
        assert "dstack_gateway_certbot_credentials: must be a dict of the certbot plugin's INI keys" in done.stdout
        assert SECRET not in done.stdout + done.stderr
        assert not (tmp_path / "state" / "dns-credentials.ini").exists()
