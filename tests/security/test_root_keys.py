"""Issue 11, finding 6: root key integrity.

As found: one flipped bit in root-k256.key, or another KMS's root-k256.key beside this root CA,
loaded silently as a different key (every app's k256 key changed); with the three key files
deleted, the KMS made new root keys although its audit log, rpc certificate and nonce database
showed it had keys. Now root-keys.manifest.json, written with the keys, is checked at every load,
and new keys are made only in a directory that never held any.

Each finding is tried twice: on root_keys (the function every caller shares) and on the real
`dstack-kms serve` process, which must refuse to start.
"""

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))  # KmsProcess, boot

# pylint: disable=wrong-import-position
from ansible_collections.dstack.tee.agents.kms import tls  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import root_keys  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsRefused  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402
from conftest import free_port  # noqa: E402
from test_kms import VM_CONFIG, boot  # noqa: E402
from test_kms_server import KMS, KmsProcess  # noqa: E402

KEY_FILES = (root_keys.ROOT_CA_KEY, root_keys.ROOT_CA_CERT, root_keys.ROOT_K256_KEY)
MANIFEST = "root-keys.manifest.json"  # the name the README documents
BACKUP_FILES = KEY_FILES + (MANIFEST,)


def flip_bit(path, byte=-1, bit=0):
    data = bytearray(path.read_bytes())
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def refused_to_start(state_dir):
    """The output of a `dstack-kms serve` that exited without listening (exit code 2)."""
    server = KmsProcess(state_dir, free_port())
    try:
        with pytest.raises(AssertionError, match="dstack-kms exited") as exited:
            server.start()
    finally:
        server.stop()
    assert server.proc.returncode == 2
    return str(exited.value)


def served_once(state_dir):
    """Start the real KMS, refuse one GetAppKey (an audit line), stop: what a KMS that served leaves."""
    server = KmsProcess(state_dir, free_port()).start()
    try:
        meta = server.client().get_meta()
        cvm = SimTdx(str(state_dir / "tdx-sim"), rtmr_state=str(state_dir.parent / "cvm-rtmrs.json"))
        with pytest.raises(KmsRefused):
            server.client().get_app_key(cvm, boot(cvm), VM_CONFIG)  # the fresh allowlist allows nothing
    finally:
        server.stop()
    assert (state_dir / "audit.log").exists() and (state_dir / tls.RPC_CERT).exists()
    return meta


def kms_cli(*args):
    return subprocess.run([KMS, *args], capture_output=True, text=True, timeout=60, check=False)


# ---- a changed key file ------------------------------------------------------------------------

def test_finding_6_a_flipped_bit_in_root_k256_key_is_refused_naming_it(tmp_path):
    state = tmp_path / "kms"
    root_keys.load_or_create(str(state))
    flip_bit(state / root_keys.ROOT_K256_KEY)
    with pytest.raises(DstackError, match=r"^root-k256\.key: holds another k256 key .*dstack-kms restore"):
        root_keys.load(str(state))
    with pytest.raises(DstackError, match=r"^root-k256\.key: "):
        root_keys.load_or_create(str(state))


def test_finding_6_a_flipped_bit_in_root_k256_key_stops_dstack_kms_serve(tmp_path):
    state = tmp_path / "kms"
    served_once(state)
    damaged = state / root_keys.ROOT_K256_KEY
    flip_bit(damaged)
    before = damaged.read_bytes()
    out = refused_to_start(state)
    assert "error: root-k256.key: holds another k256 key" in out and "dstack-kms restore" in out
    assert damaged.read_bytes() == before  # refused, not repaired or replaced


def test_finding_6_a_flipped_bit_in_the_ca_key_or_certificate_names_that_file(tmp_path):
    state = tmp_path / "kms"
    root_keys.load_or_create(str(state))
    for name in (root_keys.ROOT_CA_KEY, root_keys.ROOT_CA_CERT):
        original = (state / name).read_bytes()
        flip_bit(state / name, byte=len(original) // 2)
        with pytest.raises(DstackError, match=rf"^{name}: "):
            root_keys.load(str(state))
        (state / name).write_bytes(original)
    root_keys.load(str(state))


def test_finding_6_another_kms_k256_key_beside_this_root_ca_is_refused(tmp_path):
    this, other = tmp_path / "this", tmp_path / "other"
    root_keys.load_or_create(str(this))
    other_keys, _created = root_keys.load_or_create(str(other))
    shutil.copy2(other / root_keys.ROOT_K256_KEY, this / root_keys.ROOT_K256_KEY)
    with pytest.raises(DstackError, match=rf"^root-k256\.key: holds another k256 key than this KMS's \(public key "
                                          rf"{other_keys.k256_pubkey.hex()}"):
        root_keys.load(str(this))


def test_finding_6_another_kms_k256_key_beside_this_root_ca_stops_dstack_kms_serve(tmp_path):
    this, other = tmp_path / "this", tmp_path / "other"
    served_once(this)
    root_keys.load_or_create(str(other))
    shutil.copy2(other / root_keys.ROOT_K256_KEY, this / root_keys.ROOT_K256_KEY)
    assert "error: root-k256.key: holds another k256 key" in refused_to_start(this)


def test_finding_6_a_root_key_readable_by_others_is_refused(tmp_path):
    state = tmp_path / "kms"
    root_keys.load_or_create(str(state))
    os.chmod(state / root_keys.ROOT_CA_KEY, 0o644)
    with pytest.raises(DstackError, match=r"^root-ca\.key: has mode 0644: .*chmod 600"):
        root_keys.load(str(state))
    assert "error: root-ca.key: has mode 0644" in refused_to_start(state)
    os.chmod(state / root_keys.ROOT_CA_KEY, 0o600)
    root_keys.load(str(state))


def test_finding_6_a_damaged_manifest_is_refused_naming_it(tmp_path):
    state = tmp_path / "kms"
    root_keys.load_or_create(str(state))
    (state / MANIFEST).write_text("{not json")
    with pytest.raises(DstackError, match=r"^root-keys\.manifest\.json: is corrupt"):
        root_keys.load(str(state))


# ---- lost key files: never replaced by new keys --------------------------------------------------

@pytest.mark.parametrize("left", ["audit.log", tls.RPC_CERT, tls.RPC_KEY, "nonces.sqlite3", "nonces.sqlite3-wal",
                                  MANIFEST])
def test_finding_6_deleted_key_files_with_proof_of_keys_are_refused(tmp_path, left):
    state = tmp_path / "kms"
    root_keys.load_or_create(str(state))
    (state / left).write_bytes((state / left).read_bytes() if (state / left).exists() else b"x")
    for name in BACKUP_FILES:
        if name != left:
            (state / name).unlink(missing_ok=True)
    with pytest.raises(DstackError, match=rf"^state_dir: .* holds no root keys, but .*{left} show that this KMS had "
                                          r"some: refusing to make new ones.*dstack-kms restore"):
        root_keys.load_or_create(str(state))
    assert sorted(os.listdir(state)) == [left]  # no new key file


def test_finding_6_an_audit_log_kept_elsewhere_also_proves_keys(tmp_path):
    audit = tmp_path / "audit.log"
    audit.write_text('{"decision": "release"}\n')
    with pytest.raises(DstackError, match="audit.log show that this KMS had some"):
        root_keys.load_or_create(str(tmp_path / "kms"), also_history=[str(audit)])
    assert not (tmp_path / "kms" / root_keys.ROOT_K256_KEY).exists()


def test_finding_6_dstack_kms_serve_makes_no_new_keys_after_its_key_files_were_deleted(tmp_path):
    state = tmp_path / "kms"
    served_once(state)
    for name in BACKUP_FILES:  # the three key files as found, and the manifest too: the rest still proves keys
        (state / name).unlink(missing_ok=True)
    out = refused_to_start(state)
    assert "holds no root keys, but" in out and "refusing to make new ones" in out
    for proof in ("audit.log", tls.RPC_CERT, "nonces"):
        assert proof in out
    assert not any((state / name).exists() for name in BACKUP_FILES)
    init = kms_cli("init", "--state-dir", str(state))
    assert init.returncode == 2 and "refusing to make new ones" in init.stderr
    assert not any((state / name).exists() for name in BACKUP_FILES)


# ---- what still works -------------------------------------------------------------------------

def test_finding_6_a_fresh_state_dir_makes_keys_and_their_manifest(tmp_path):
    state = tmp_path / "kms"
    state.mkdir()
    (state / "kms.toml").write_text('listen = "127.0.0.1:9201"\n')  # the kms role writes these before the first start
    (state / "auth-config.json").write_text("{}")
    keys, created = root_keys.load_or_create(str(state))
    assert created
    manifest = json.loads((state / MANIFEST).read_text())
    assert manifest["format"] == "dstack-kms-root-keys/1" and manifest["origin"] == "created"
    assert manifest["k256_pubkey"] == keys.k256_pubkey.hex()
    import hashlib  # pylint: disable=import-outside-toplevel
    assert manifest["files"] == {n: hashlib.sha256((state / n).read_bytes()).hexdigest() for n in KEY_FILES}
    for name in (root_keys.ROOT_CA_KEY, root_keys.ROOT_K256_KEY, MANIFEST):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name


def test_finding_6_a_restart_with_intact_keys_loads_the_same_keys(tmp_path):
    state = tmp_path / "kms"
    first = served_once(state)
    manifest = (state / MANIFEST).read_bytes()
    server = KmsProcess(state, free_port()).start()
    try:
        assert server.client().get_meta()["k256_pubkey"] == first["k256_pubkey"]
    finally:
        server.stop()
    assert (state / MANIFEST).read_bytes() == manifest
    assert root_keys.load_or_create(str(state))[1] is False


def test_finding_6_a_state_dir_from_before_manifests_is_adopted_once(tmp_path, caplog):
    state = tmp_path / "kms"
    keys, _created = root_keys.load_or_create(str(state))
    tls.ensure_rpc_cert(str(state), keys, ["localhost"])
    (state / MANIFEST).unlink(missing_ok=True)  # as every state directory was before this change
    with caplog.at_level(logging.WARNING, logger="dstack.kms.root_keys"):
        assert root_keys.pem_forms(root_keys.load(str(state))) == root_keys.pem_forms(keys)
    assert "wrote the manifest" in caplog.text and keys.k256_pubkey.hex() in caplog.text
    assert json.loads((state / MANIFEST).read_text())["origin"] == "adopted"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dstack.kms.root_keys"):
        root_keys.load(str(state))
    assert caplog.text == ""  # once
    flip_bit(state / root_keys.ROOT_K256_KEY)
    with pytest.raises(DstackError, match=r"^root-k256\.key: holds another k256 key"):
        root_keys.load(str(state))


def test_finding_6_old_key_files_of_another_kms_are_not_adopted(tmp_path):
    """Without a manifest, the rpc certificate still tells whose root CA this directory served with."""
    this, other = tmp_path / "this", tmp_path / "other"
    keys, _created = root_keys.load_or_create(str(this))
    tls.ensure_rpc_cert(str(this), keys, ["localhost"])
    root_keys.load_or_create(str(other))
    for name in BACKUP_FILES:
        (this / name).unlink(missing_ok=True)
    for name in KEY_FILES:
        shutil.copy2(other / name, this / name)
    with pytest.raises(DstackError, match=r"^rpc\.crt: in .* was issued by another root CA"):
        root_keys.load(str(this))
    assert not (this / MANIFEST).exists()


# ---- restore from backup, onboarding ---------------------------------------------------------------

def test_finding_6_restore_from_backup_brings_the_same_kms_back(tmp_path):
    state, backup = tmp_path / "kms", tmp_path / "backup"
    meta = served_once(state)
    backup.mkdir(mode=0o700)
    for name in BACKUP_FILES:  # the README's backup: the four files, cp -p
        shutil.copy2(state / name, backup / name)
    for name in BACKUP_FILES:  # the disk lost them
        (state / name).unlink(missing_ok=True)
    assert "refusing to make new ones" in refused_to_start(state)

    restored = kms_cli("restore", "--state-dir", str(state), "--backup", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["changed"] is True
    assert json.loads(restored.stdout)["k256_pubkey"] == meta["k256_pubkey"]
    for name in (root_keys.ROOT_CA_KEY, root_keys.ROOT_K256_KEY, MANIFEST):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    server = KmsProcess(state, free_port()).start()
    try:
        assert server.client().get_meta()["k256_pubkey"] == meta["k256_pubkey"]
    finally:
        server.stop()
    again = kms_cli("restore", "--state-dir", str(state), "--backup", str(backup))
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False


def test_finding_6_restore_replaces_a_damaged_file_the_manifest_names(tmp_path):
    state, backup = tmp_path / "kms", tmp_path / "backup"
    keys, _created = root_keys.load_or_create(str(state))
    shutil.copytree(state, backup)
    flip_bit(state / root_keys.ROOT_K256_KEY)
    restored, changed = root_keys.restore(str(state), str(backup))
    assert changed and restored.k256_key == keys.k256_key == root_keys.load(str(state)).k256_key


def test_finding_6_restore_refuses_a_damaged_backup_or_another_kms(tmp_path):
    state, backup, other = tmp_path / "kms", tmp_path / "backup", tmp_path / "other"
    served_once(state)
    shutil.copytree(state, backup)
    root_keys.load_or_create(str(other))
    flip_bit(backup / root_keys.ROOT_K256_KEY)
    for name in BACKUP_FILES:
        (state / name).unlink(missing_ok=True)
    out = kms_cli("restore", "--state-dir", str(state), "--backup", str(backup))
    assert out.returncode == 2 and "backup root-k256.key: holds another k256 key" in out.stderr
    out = kms_cli("restore", "--state-dir", str(state), "--backup", str(other))
    assert out.returncode == 2 and "rpc.crt: in" in out.stderr and "issued by another root CA" in out.stderr
    assert not any((state / name).exists() for name in BACKUP_FILES)


def test_finding_6_a_backup_from_before_manifests_restores_and_gets_one(tmp_path):
    state, backup = tmp_path / "kms", tmp_path / "backup"
    keys, _created = root_keys.load_or_create(str(state))
    backup.mkdir()
    for name in KEY_FILES:  # the README's old backup: three files
        shutil.copy2(state / name, backup / name)
    for name in BACKUP_FILES:
        (state / name).unlink(missing_ok=True)
    (state / "audit.log").write_text("{}\n")
    restored, changed = root_keys.restore(str(state), str(backup))
    assert changed and restored.k256_pubkey == keys.k256_pubkey
    assert json.loads((state / MANIFEST).read_text())["origin"] == "installed"


def test_finding_6_onboarding_writes_the_manifest_and_takes_only_the_keys_it_names(tmp_path):
    source, _created = root_keys.load_or_create(str(tmp_path / "source"))
    other, _created = root_keys.load_or_create(str(tmp_path / "other"))
    replica = tmp_path / "replica"
    keys, changed = root_keys.install(str(replica), *root_keys.pem_forms(source))
    assert changed and json.loads((replica / MANIFEST).read_text())["k256_pubkey"] == source.k256_pubkey.hex()
    assert stat.S_IMODE((replica / MANIFEST).stat().st_mode) == 0o600
    flip_bit(replica / root_keys.ROOT_K256_KEY)
    with pytest.raises(DstackError, match=r"^root-k256\.key: holds another k256 key"):
        root_keys.load(str(replica))
    for name in KEY_FILES:
        (replica / name).unlink(missing_ok=True)
    with pytest.raises(DstackError, match=r"manifest\.json names other root keys .*nothing was written"):
        root_keys.install(str(replica), *root_keys.pem_forms(other))
    assert not (replica / root_keys.ROOT_K256_KEY).exists()
    assert root_keys.install(str(replica), *root_keys.pem_forms(source))[0].k256_key == keys.k256_key
