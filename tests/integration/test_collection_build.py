"""The collection works after `ansible-galaxy collection build` and `install`, not only from the checkout."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import ROOT

BIN = Path(sys.executable).parent


def test_build_install_and_use(tmp_path):
    built = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT), "--output-path",
                            str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr
    tarball = next(tmp_path.glob("dstack-tee-*.tar.gz"))
    with tarfile.open(tarball) as archive:
        names = archive.getnames()
    assert "plugins/modules/app_compose.py" in names and "agents/kms/service.py" in names
    assert not [n for n in names if n.startswith((".venv", ".git/", ".demo")) or "__pycache__" in n
                or "node_modules" in n]  # contracts/node_modules (solc, ganache) is ~200 MB of build tools
    assert "contracts/artifacts/DstackKms.json" in names and tarball.stat().st_size < 5 * 1024 * 1024

    collections = tmp_path / "collections"
    # Only the installed copy is visible: no repository ansible.cfg, no scan of the venv's path.
    (tmp_path / "ansible.cfg").write_text(f"[defaults]\ncollections_path = {collections}\n")
    env = dict(os.environ, ANSIBLE_CONFIG=str(tmp_path / "ansible.cfg"), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false")
    installed = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(tarball), "-p",
                                str(collections)], capture_output=True, text=True, env=env, timeout=300,
                               check=False)
    assert installed.returncode == 0, installed.stderr
    assert (collections / "ansible_collections" / "dstack" / "tee" / "plugins" / "modules" / "app_compose.py").is_file()
    (tmp_path / "compose.yaml").write_text("services:\n  web:\n    image: nginx\n")
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - dstack.tee.app_compose:\n        compose_file: compose.yaml\n        name: x\n"
        "        dest: app-compose.json\n      register: out\n"
        "    - ansible.builtin.copy:\n        content: '{{ out | to_json }}'\n        dest: out.json\n        mode: '0644'\n")
    ran = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                          f"ansible_python_interpreter={sys.executable}", "play.yml"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["compose_hash"] and (tmp_path / "app-compose.json").exists()
    listed = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "list", "-p", str(collections)],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert "dstack.tee" in listed.stdout
