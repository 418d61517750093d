"""README's "On a real TDX server": every command it shows, run here.

The section's indented code blocks are read from README.md: `# inventory.yml` and `# secrets.yml`
blocks are files (written to a temporary folder, the inventory pointed at it: dstack_root and the
KMS's and VMM's ports), every other line is a command. Each command must match one of RUNNERS, which
run it as written, in the section's order, from the repository root (or a temporary folder), with
PATH=/usr/bin:/bin and a temporary HOME, adding only what points it at this machine:

- the vault password, `export` and `ansible-vault encrypt`: as written (the later commands read the
  encrypted secrets.yml through the exported password file);
- the facts module: `-a sysroot=` each fixture tree (ready; TDX off in the BIOS; an old kernel);
- site.yml with dstack_tdx_host_provision: `--check -e dstack_tdx_host_sysroot=` a copy of the ready
  fixture (it converges, the copy and dstack_root untouched) and of the one with TDX off in the BIOS
  (it stops at the start naming every BIOS item with its fix, and no later play runs);
- the sample image's build.sh: as written;
- deploy-app.yml: `--check`, against a KMS and a VMM (process backend, the secrets' token) started here;
- verify-app.yml: APP_ID the app_id deploy-app.yml printed; no app answers here, so it must get as far
  as asking the CVM's Worker for a quote, and fail there naming that URL;
- build-guest-image.sh: `--help`, which must document each flag the README gives (the build itself,
  one to two minutes, is test_guest_image's);
- scp: from a folder holding a stand-in image, to this machine's images directory (root@SERVER: left
  out, /var/lib/dstack the test's dstack_root), which must be where the libvirt backend looks.

A command no runner knows fails the test, so the section cannot gain an untested command; a runner
no command used fails it too (a step went missing). No secret of secrets.yml may show in any output.
"""

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port
from test_kms_server import KmsProcess
from test_vmm import VmmProcess
from ansible_collections.dstack.tee.plugins.module_utils import tdx_host

HEADING = "### On a real TDX server"
FIXTURES = ROOT / "tests" / "fixtures" / "tdx_host"
# The roles whose variables the section's inventory and secrets may set.
ROLES = ("tdx_host", "kms", "gateway", "vmm", "acme_lab", "app")
# Outside of a file block, these are the commands' environment (README: "Every command the README
# shows must work exactly as written", in `env -i PATH=/usr/bin:/bin bash`).
PATH = "/usr/bin:/bin"


def section():
    text = (ROOT / "README.md").read_text()
    start = text.index(HEADING + "\n")
    end = re.compile(r"^#{1,3} ", re.M).search(text, start + len(HEADING))
    return text[start:end.start() if end else len(text)]


def code_blocks(text):
    """Markdown's indented code blocks (4 spaces, after a blank line), dedented."""
    blocks, current, previous_blank = [], None, True
    for line in text.splitlines():
        if current is not None and (line.startswith("    ") or not line.strip()):
            current.append(line[4:])
        elif line.startswith("    ") and previous_blank:
            current = [line[4:]]
            blocks.append(current)
        else:
            current = None
        previous_blank = not line.strip()
    return ["\n".join(block).strip("\n") for block in blocks]


def files_and_commands(text):
    """({'inventory.yml': text, 'secrets.yml': text}, [command, ...]) of the section, in order."""
    files, commands = {}, []
    for block in code_blocks(text):
        first = block.splitlines()[0]
        match = re.match(r"# (\S+\.yml):", first)
        if match:
            files[match.group(1)] = block + "\n"
            continue
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return files, commands


def runner_for(command):
    matches = [runner for runner in RUNNERS if re.fullmatch(runner[1], command)]
    assert len(matches) == 1, (f"README {HEADING!r}: the test does not know how to run {command!r} "
                               f"(runners matching: {[m[0] for m in matches]}); add a runner that runs "
                               "it here (in check mode, or on the fixtures) or leave the command out")
    return matches[0]


def known_variables():
    """The roles' options, and the playbooks' own switches (playbooks/group_vars/all.yml)."""
    names = set(yaml.safe_load((ROOT / "playbooks" / "group_vars" / "all.yml").read_text()))
    for role in ROLES:
        spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
        names.update(spec["argument_specs"]["main"]["options"])
    return names


def secret_values(secrets_text):
    def leaves(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in leaves(v)]
        if isinstance(value, list):
            return [s for v in value for s in leaves(v)]
        return [str(value)]
    return leaves(yaml.safe_load(secrets_text))


def tree_state(folder):
    """Every path under folder with its mode and content (or link target)."""
    state = {}
    for path in sorted(Path(folder).rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        state[str(path.relative_to(folder))] = (oct(info.st_mode), what)
    return state


def flat(text):
    """Text with every run of whitespace one space (Ansible folds long messages over lines)."""
    return " ".join(text.split())


class Walk:
    """What the commands share: the temporary folders, the environment, the services, the results."""

    def __init__(self, files):
        self.tmp = Path(tempfile.mkdtemp(prefix="drt-", dir="/tmp"))  # short: the VMM's sockets
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.root = self.tmp / "root"              # the inventory's dstack_root
        self.env = {"PATH": PATH, "HOME": str(self.home), "LANG": "C.UTF-8"}
        self.readme_inventory = yaml.safe_load(files["inventory.yml"])
        self.host_vars = self.readme_inventory["all"]["hosts"]["localhost"]
        self.secrets_text = files["secrets.yml"]
        self.secrets = yaml.safe_load(self.secrets_text)
        self.kms_port, self.vmm_port = free_port(), free_port()
        inventory = json.loads(json.dumps(self.readme_inventory))
        inventory["all"]["hosts"]["localhost"].update({
            "dstack_root": str(self.root), "dstack_kms_listen": f"127.0.0.1:{self.kms_port}",
            "dstack_vmm_listen": f"127.0.0.1:{self.vmm_port}"})
        self.inventory = self.tmp / "inventory.yml"
        self.inventory.write_text(yaml.safe_dump(inventory, sort_keys=False))
        self.secrets_file = self.tmp / "secrets.yml"
        self.secrets_file.write_text(self.secrets_text)
        self.outputs = []
        self.services = []
        self.app_id = None

    def run(self, command, cwd=ROOT, timeout=300):
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        self.outputs.append((command, proc.stdout + proc.stderr))
        return proc

    def local(self, command):
        """The command on this machine's files: the test's inventory and (encrypted) secrets."""
        command = re.sub(r"(?<=-i )inventory\.yml\b", str(self.inventory), command)
        return re.sub(r"(?<=@)secrets\.yml\b|(?<=encrypt )secrets\.yml\b", str(self.secrets_file), command)

    def sysroot_copy(self, fixture):
        """A copy of a fixture tree the role may write into; a ready host has PCCS's packaged
        configuration (as molecule/tdx_host's copy has), so the API key's task runs too."""
        copy = self.tmp / "sysroots" / fixture
        shutil.copytree(FIXTURES / fixture, copy, symlinks=True)
        if fixture == "ready":
            config = copy / "opt/intel/sgx-dcap-pccs/config"
            config.mkdir(parents=True)
            shutil.copy(ROOT / "molecule/tdx_host/files/pccs-default.json", config / "default.json")
        return copy

    def close(self):
        for service in reversed(self.services):
            service.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_vault_password(walk, command):
    proc = walk.run(command)
    assert proc.returncode == 0, proc.stderr
    password = walk.home / ".dstack-vault-pass"
    assert stat.S_IMODE(password.stat().st_mode) == 0o600 and len(password.read_text().strip()) >= 32


def run_export(walk, command):
    name, _sep, value = command[len("export "):].partition("=")
    proc = walk.run(f"printf %s {value}")   # the shell's expansion of it (~)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    walk.env[name] = proc.stdout


def run_vault_encrypt(walk, command):
    proc = walk.run(walk.local(command))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert walk.secrets_file.read_text().startswith("$ANSIBLE_VAULT;")


def run_facts(walk, command):
    def facts(fixture):
        proc = walk.run(walk.local(command) + f" -a sysroot={FIXTURES / fixture}")
        assert proc.returncode == 0 and " | SUCCESS => " in proc.stdout, proc.stdout + proc.stderr
        return yaml.safe_load(proc.stdout.partition(" => ")[2])

    ready = facts("ready")
    assert ready["ready"] is True and ready["missing"] == [], ready["missing"]
    off = facts("tdx_off_in_bios")
    assert off["ready"] is False
    assert {"bios_tme", "bios_tdx", "bios_sgx"} <= {m["item"] for m in off["missing"] if m["kind"] == "bios"}
    old = facts("old_kernel")
    assert "kernel_tdx" in {m["item"] for m in old["missing"] if m["kind"] == "kernel"}, old["missing"]


def run_site(walk, command):
    check = walk.local(command) + " --check -e dstack_tdx_host_sysroot={}"
    ready = walk.sysroot_copy("ready")
    before = tree_state(ready)
    proc = walk.run(check.format(ready))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and re.search(r"localhost\s+: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=0", out), out[-4000:]
    for task in ("dstack.tee.tdx_host : Put the TDX kernel parameters on the kernel command line",
                 "dstack.tee.tdx_host : Configure QGS (/etc/qgs.conf)",
                 "dstack.tee.tdx_host : Set the PCCS configuration", "dstack.tee.kms : Write the KMS configuration",
                 "dstack.tee.gateway : Write the gateway configuration", "dstack.tee.vmm : Run the VMM under supervisord"):
        assert f"TASK [{task}" in out, f"site.yml did not run {task!r}:\n{out[-4000:]}"
    assert "dstack.tee.tdx_host : Stop before changing anything" in out and "This host is not ready" not in out
    # Check mode: nothing written into the host's tree, nothing made under dstack_root.
    assert tree_state(ready) == before
    assert not walk.root.exists(), sorted(str(p) for p in walk.root.rglob("*"))[:20]

    off = walk.sysroot_copy("tdx_off_in_bios")
    before = tree_state(off)
    proc = walk.run(check.format(off))
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode != 0, out[-3000:]
    assert "Stop before changing anything when the hardware, BIOS or kernel is not ready" in out, out[-3000:]
    _ready, _facts, missing = tdx_host.gather(str(off))
    bios = [m for m in missing if m["kind"] == "bios"]
    assert {"bios_tme", "bios_tdx", "bios_sgx"} <= {m["item"] for m in bios}
    for item in bios:
        assert f"[bios] {item['item']}:" in out and flat(item["fix"]) in out, (item, out[-3000:])
    assert "PLAY [The KMS]" not in out
    assert tree_state(off) == before and not walk.root.exists()


def run_hello_image(walk, command):
    proc = walk.run(command)
    assert proc.returncode == 0 and "image localhost/dstack-hello:latest: " in proc.stdout, proc.stdout + proc.stderr


def run_deploy(walk, command):
    kms = KmsProcess(walk.root / "kms", walk.kms_port)
    walk.services.append(kms)
    kms.start()
    vmm = VmmProcess(walk.root / "run", kms, walk.vmm_port, token=walk.secrets["dstack_vmm_tokens"][0])
    walk.services.append(vmm)
    vmm.start()
    allowlist = (walk.root / "kms" / "auth-config.json").read_text()
    proc = walk.run(walk.local(command) + " --check")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    base = walk.host_vars["dstack_gateway_base_domain"]
    match = re.search(r"^\s*url:\s+https://([0-9a-f]{40})\." + re.escape(base) + r"/$", proc.stdout, re.M)
    assert match and re.search(r"^\s*app:\s+hello$", proc.stdout, re.M), proc.stdout[-3000:]
    assert re.search(r"^\s*app_id:\s+" + match.group(1) + "$", proc.stdout, re.M)
    walk.app_id = match.group(1)
    # Check mode: the allowlist as it was, no CVM.
    assert (walk.root / "kms" / "auth-config.json").read_text() == allowlist
    assert vmm.client().call("Status", {})["vms"] == []


def run_verify(walk, command):
    assert walk.app_id, "verify-app.yml comes after deploy-app.yml"
    proc = walk.run(walk.local(command.replace("APP_ID", walk.app_id)))
    out = flat(proc.stdout + proc.stderr)
    base = walk.host_vars["dstack_gateway_base_domain"]
    # Nothing answers for the app here: its arguments, app folder and trust roots were taken, and the
    # first network step, the Worker's quote, is where it stops.
    assert proc.returncode != 0, out[-3000:]
    assert f"worker: cannot reach https://{walk.app_id}-8090.{base}/prpc/Worker.Attest" in out, out[-3000:]


def run_build_image(walk, command):
    proc = walk.run("scripts/build-guest-image.sh --help")
    assert proc.returncode == 0, proc.stderr
    usage = re.search(r"^# Usage: (.*)$", proc.stdout, re.M)
    assert usage, proc.stdout
    for flag in re.findall(r"\s(--[\w-]+)", command):
        assert flag in usage.group(1), f"{flag} is not in the script's usage: {usage.group(1)}"


def run_scp(walk, command):
    dest = re.fullmatch(r"scp -r build/guest-image root@SERVER:(\S+)", command).group(1)
    # The folder the role makes, where the libvirt backend looks: images/ under the VMM's run path.
    images = walk.host_vars["dstack_tdx_host_images_dir"]
    assert os.path.dirname(dest) == images, (dest, images)
    vmm_defaults = yaml.safe_load((ROOT / "roles/vmm/defaults/main.yml").read_text())
    assert vmm_defaults["dstack_vmm_run_path"] == "{{ dstack_root }}/run"
    assert images == walk.host_vars["dstack_root"] + "/run/images"
    # A stand-in image in the builder's checkout; the server's root is the test's dstack_root.
    builder = walk.tmp / "builder"
    image = builder / "build" / "guest-image"
    image.mkdir(parents=True)
    (image / "metadata.json").write_text('{"kernel": "bzImage"}\n')
    (image / "digest.txt").write_text("0" * 64 + "\n")
    local_images = walk.root / os.path.relpath(images, walk.host_vars["dstack_root"])
    local_images.mkdir(parents=True, exist_ok=True)
    local = command.replace("root@SERVER:", "").replace(walk.host_vars["dstack_root"] + "/", str(walk.root) + "/")
    proc = walk.run(local, cwd=builder)
    assert proc.returncode == 0, proc.stderr
    copied = local_images / os.path.basename(dest)
    assert (copied / "metadata.json").read_text() == '{"kernel": "bzImage"}\n' and (copied / "digest.txt").exists()


# (name, the command as the README writes it, how it runs here)
RUNNERS = [
    ("vault password", r"\(umask 077 && openssl rand -base64 32 > ~/\.dstack-vault-pass\)", run_vault_password),
    ("export", r"export ANSIBLE_VAULT_PASSWORD_FILE=~/\.dstack-vault-pass", run_export),
    ("vault encrypt", r"\.venv/bin/ansible-vault encrypt secrets\.yml", run_vault_encrypt),
    ("facts", r"\.venv/bin/ansible dstack_vmm -i inventory\.yml -m dstack\.tee\.tdx_host_facts", run_facts),
    ("site.yml", r"\.venv/bin/ansible-playbook -i inventory\.yml playbooks/site\.yml -e @secrets\.yml "
                 r"-e dstack_tdx_host_provision=true", run_site),
    ("hello image", r"examples/hello/image/build\.sh", run_hello_image),
    ("deploy-app.yml", r"\.venv/bin/ansible-playbook -i inventory\.yml playbooks/deploy-app\.yml -e @secrets\.yml "
                       r"-e app_dir=examples/hello", run_deploy),
    ("verify-app.yml", r"\.venv/bin/ansible-playbook -i inventory\.yml playbooks/verify-app\.yml "
                       r"-e app_url=https://APP_ID\.apps\.example\.com -e app_dir=examples/hello -e ca_cert=", run_verify),
    ("guest image", r"scripts/build-guest-image\.sh --out build/guest-image", run_build_image),
    ("scp", r"scp -r build/guest-image root@SERVER:/\S+", run_scp),
]


def test_every_command_of_the_section_runs_here():
    files, commands = files_and_commands(section())
    assert set(files) == {"inventory.yml", "secrets.yml"}, sorted(files)
    runners = [runner_for(command) for command in commands]   # all known before anything runs
    assert {r[0] for r in runners} == {r[0] for r in RUNNERS}, "a step of the section is gone"
    walk = Walk(files)
    try:
        # The files: the three groups on this host over the local connection, and nothing but the
        # roles' own variables (a misspelt one would be silently ignored by Ansible).
        groups = walk.readme_inventory["all"]["children"]
        assert all("localhost" in groups[g]["hosts"] for g in ("dstack_kms", "dstack_gateway", "dstack_vmm"))
        assert walk.host_vars["ansible_connection"] == "local"
        options = known_variables()
        unknown = [k for k in list(walk.host_vars) + list(walk.secrets)
                   if not k.startswith("ansible_") and k not in options]
        assert not unknown, f"not a variable of the roles {ROLES} or the playbooks: {unknown}"
        started = time.monotonic()
        for command, (_name, _pattern, run) in zip(commands, runners):
            run(walk, command)
        secrets = secret_values(walk.secrets_text)
        for command, output in walk.outputs:
            shown = [s for s in secrets if s in output]
            assert not shown, f"{command!r} showed a secret of secrets.yml"
        print(f"the section's {len(commands)} commands ran in {time.monotonic() - started:.1f} s")
    finally:
        walk.close()


def test_a_command_no_runner_knows_fails():
    with pytest.raises(AssertionError, match="does not know how to run 'curl https://example.com'"):
        runner_for("curl https://example.com")
    # One changed word is another command.
    with pytest.raises(AssertionError, match="does not know how to run"):
        runner_for(".venv/bin/ansible-playbook -i inventory.yml playbooks/site.yml -e @secrets.yml")


def test_the_section_names_every_bios_setting_and_every_secret():
    text = section()
    source = (ROOT / "plugins/module_utils/tdx_host.py").read_text()
    # The fixes the facts module gives for BIOS items, their string literals joined as Python joins them.
    joined = re.sub(r'"\s*\n\s*f?"', "", source)
    fixes = re.findall(r'f?"(BIOS: [^"]*)"', joined)
    settings = {name for fix in fixes for name in re.findall(r"'([^']+)'", fix)}
    assert len(settings) >= 9, settings
    flat_text = flat(text)
    missing = sorted(s for s in settings if f"'{s}'" not in flat_text)
    assert not missing, f"BIOS settings the facts module names that the section does not: {missing}"
    for menu in re.findall(r'BIOS_\w+_MENU = "([^"]+)"', source):
        assert menu in flat_text, menu
    # Every secret the roles site.yml runs take (no_log options) is in the secrets file and named.
    files, _commands = files_and_commands(text)
    secrets = yaml.safe_load(files["secrets.yml"])
    for role in ("tdx_host", "kms", "gateway", "vmm"):
        spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
        for name, option in spec["argument_specs"]["main"]["options"].items():
            if option.get("no_log"):
                assert name in secrets, f"{role}'s secret {name} is not in the section's secrets.yml"
    keep = text[text.index("**What to keep secret.**"):]
    for name in ("dstack_tdx_host_pccs_api_key", "dstack_vmm_tokens", "dstack_gateway_certbot_credentials",
                 "root-ca.key", "root-k256.key", "tdx-sim", "secrets.env", ".dstack-vault-pass"):
        assert name in keep, name
