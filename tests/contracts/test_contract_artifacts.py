"""The committed artifacts match contracts/src (recompiled with the pinned solcjs when present)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.plugins.module_utils.contract_artifacts import ARTIFACTS

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "contracts"
NAMES = ["DstackKms", "DstackApp", "IAppAuth", "IAppAuthBasicManagement", "ERC1967Proxy"]


def test_python_copy_matches_json_artifacts():
    for name in NAMES:
        artifact = json.loads((CONTRACTS / "artifacts" / f"{name}.json").read_text())
        assert artifact["compiler"]["settings"]["evmVersion"] == "shanghai"
        assert ARTIFACTS[name] == {"abi": artifact["abi"], "bytecode": artifact["bytecode"]}


def test_interface_ids():
    eth_utils = pytest.importorskip("eth_utils")

    def interface_id(name):
        value = 0
        for item in ARTIFACTS[name]["abi"]:
            if item["type"] == "function" and item["name"] != "supportsInterface":
                types = ",".join(_abi_type(i) for i in item["inputs"])
                value ^= int.from_bytes(eth_utils.keccak(text=f"{item['name']}({types})")[:4], "big")
        return f"0x{value:08x}"

    assert interface_id("IAppAuth") == "0x1e079198"
    assert interface_id("IAppAuthBasicManagement") == "0x8fd37527"


def _abi_type(item):
    if item["type"].startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in item["components"]) + ")" + item["type"][len("tuple"):]
    return item["type"]


def test_artifacts_match_sources(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (scripts/setup.sh installs nodejs and npm)")
    if not (CONTRACTS / "node_modules" / "solc" / "package.json").exists():
        pytest.skip("the pinned solc is not installed (scripts/setup.sh runs `npm ci` in contracts/)")
    out = subprocess.run([node, str(CONTRACTS / "compile.js"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr
    for name in NAMES:
        fresh = (tmp_path / f"{name}.json").read_text()
        assert fresh == (CONTRACTS / "artifacts" / f"{name}.json").read_text(), f"{name}.json is stale: run node contracts/compile.js"
    module = ROOT / "plugins" / "module_utils" / "contract_artifacts.py"
    assert (tmp_path / "contract_artifacts.py").read_text() == module.read_text()
