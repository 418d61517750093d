"""Finding 7 of issue 11: no secret in Ansible's output, at any verbosity, with --diff.

The README's playbooks run for real (playbooks/demo.yml, then site.yml again with a second VMM
token, so that the VMM's supervisord program changes its environment), with -vvv --diff, and the
whole output is searched for every secret the run handles or makes: the VMM API tokens, the
values of examples/hello/secrets.env, every private key file under the demo's root (the KMS's root
keys and TLS key, the simulated TDX's keys), the CVMs' host API tokens and the env fingerprint key.
"""

import base64
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

# After the sys.path line above; the unused names imported are pytest fixtures.
# pylint: disable=wrong-import-position
from ansible_collections.dstack.tee.plugins.module_utils.env_crypt import parse_dotenv
from conftest import ROOT, needs_podman, run_playbook
from test_demo_playbook import TOKEN, _recap, demo_root  # noqa: F401 pylint: disable=unused-import

ROTATED_TOKEN = "rotated-vmm-token-5e1f0c2a9b"
# GREETING is left out: the app shows it on its public page, and the role prints that page.
PUBLIC_ENV = {"GREETING"}


def _key_fragments(path):
    """What would give a key file away: its PEM body lines, or its bytes as text, hex and base64."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return [line for line in data.decode().splitlines() if line and not line.startswith("-----")]
    fragments = [data.hex(), base64.b64encode(data).decode()]
    if data.isascii() and data.strip():
        fragments.append(data.decode().strip())
    return fragments


def _secrets(root):
    secrets = {"VMM token": [TOKEN], "rotated VMM token": [ROTATED_TOKEN]}
    env = parse_dotenv((ROOT / "examples" / "hello" / "secrets.env").read_text())
    for name, value in env:
        if name not in PUBLIC_ENV:
            secrets[f"secrets.env {name}"] = [value]
    files = sorted(root.rglob("*.key")) + sorted(root.rglob("host-api.token"))
    fingerprint_key = Path(os.path.expanduser("~/.ansible/dstack/env-fingerprint.key"))
    if fingerprint_key.exists():
        files.append(fingerprint_key)
    for path in files:
        secrets[str(path)] = _key_fragments(path)
    return secrets


def _context(output, fragment):
    at = output.index(fragment)
    return output[max(0, at - 300): at + len(fragment) + 100]


@needs_podman
def test_finding_7_no_secret_in_the_output_of_the_readme_playbooks_with_vvv_and_diff(demo_root, tmp_path):
    root, app, _ports, extra, _make_args = demo_root
    first = run_playbook(ROOT / "playbooks" / "demo.yml", *extra, "-e", f"app_dir={app}", "-vvv", "--diff")
    (tmp_path / "demo.log").write_text(first.stdout + first.stderr)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]

    # A second token for the VMM: its program's environment changes, and the diff says so
    # (naming the variable, hiding both values). TOKEN stays valid for the fixture's teardown.
    rotated = run_playbook(ROOT / "playbooks" / "site.yml", *extra, "-e",
                           json.dumps({"dstack_vmm_tokens": [TOKEN, ROTATED_TOKEN]}), "-vvv", "--diff")
    (tmp_path / "site.log").write_text(rotated.stdout + rotated.stderr)
    assert rotated.returncode == 0, rotated.stdout[-4000:] + rotated.stderr[-2000:]

    secrets = _secrets(root)
    assert any(name.endswith("root-k256.key") for name in secrets) and any(
        name.endswith("host-api.token") for name in secrets), sorted(secrets)
    leaks = [f"{name} in the output of {run}:\n{_context(output, fragment)}"
             for run, output in (("demo.yml", first.stdout + first.stderr), ("site.yml", rotated.stdout + rotated.stderr))
             for name, fragments in secrets.items() for fragment in fragments if fragment in output]
    assert not leaks, f"{len(leaks)} secrets in the output:\n" + "\n\n".join(leaks)

    # The change still shows: the diff names the variable and marks its hidden value as changed.
    assert _recap(rotated.stdout)["changed"] >= 1
    program_diff = re.search(r"TASK \[dstack\.tee\.vmm : Run the VMM under supervisord\].*?(?=\nTASK )",
                             rotated.stdout, re.S).group(0)
    assert "DSTACK_VMM_TOKENS: <hidden, changed>" in program_diff, program_diff[-3000:]
