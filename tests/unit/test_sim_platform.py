"""dstack.tee.sim_platform_info and dstack.tee.sim_platform, run as Ansible runs them (conftest.run_module):
a simulated TDX platform read from one folder and written to another, then the effects on disk (bytes,
modes, inodes), check mode, the diff, and the names refused."""

import os
import stat
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_module

from ansible_collections.dstack.tee.plugins.module_utils import tdx_sim

# Stand-ins in the shape of the platform's files; the real ones come from tdx_sim in the tests that need them.
FILES = {
    "root-ca.key": "-----BEGIN PRIVATE KEY-----\nroot-ca-secret-key-material\n-----END PRIVATE KEY-----\n",
    "root-ca.crt": "-----BEGIN CERTIFICATE-----\nroot-ca-certificate\n-----END CERTIFICATE-----\n",
    "attestation.key": "-----BEGIN PRIVATE KEY-----\nattestation-secret-key-material\n-----END PRIVATE KEY-----\n",
    "platform.json": '{\n  "fmspc": "00112233aabb"\n}\n',
}
SECRETS = ("root-ca-secret-key-material", "attestation-secret-key-material")
MODES = {"root-ca.key": 0o600, "root-ca.crt": 0o644, "attestation.key": 0o600, "platform.json": 0o644}


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _on_disk(folder):
    """{name: (text, mode)} of the folder's files."""
    return {path.name: (path.read_text(), _mode(path)) for path in Path(folder).iterdir()}


def _write(folder, files=None, check=False, diff=False):
    result = run_module("sim_platform", {"path": str(folder), "files": dict(FILES if files is None else files)},
                        check=check, diff=diff)
    assert not result.get("failed"), result.raw
    return result


def test_check_apply_check_apply_then_the_files_are_there_with_their_modes(tmp_path):
    dest = tmp_path / "vmm" / "tdx-sim"
    first_check = _write(dest, check=True)
    assert first_check["changed"] is True and first_check["written"] == list(FILES)
    assert not dest.parent.exists()  # check mode made nothing
    applied = _write(dest)
    assert applied["changed"] is True and applied["written"] == list(FILES)
    assert _mode(dest) == 0o700
    assert _on_disk(dest) == {name: (text, MODES[name]) for name, text in FILES.items()}
    inodes = {path.name: path.stat().st_ino for path in dest.iterdir()}
    second_check = _write(dest, check=True)
    assert second_check["changed"] is False and second_check["written"] == []
    again = _write(dest)
    assert again["changed"] is False and again["written"] == []
    assert {path.name: path.stat().st_ino for path in dest.iterdir()} == inodes  # nothing rewritten


def test_a_changed_file_is_rewritten_alone(tmp_path):
    _write(tmp_path)
    (tmp_path / "root-ca.crt").write_text("an older certificate\n")
    others = {name: (tmp_path / name).stat().st_ino for name in FILES if name != "root-ca.crt"}
    result = _write(tmp_path)
    assert result["changed"] is True and result["written"] == ["root-ca.crt"]
    assert (tmp_path / "root-ca.crt").read_text() == FILES["root-ca.crt"]
    assert _mode(tmp_path / "root-ca.crt") == 0o644
    assert {name: (tmp_path / name).stat().st_ino for name in others} == others


def test_new_content_replaces_the_old(tmp_path):
    _write(tmp_path)
    newer = dict(FILES, **{"platform.json": '{"fmspc": "ffffffffffff"}\n'})
    result = _write(tmp_path, newer)
    assert result["written"] == ["platform.json"]
    assert (tmp_path / "platform.json").read_text() == newer["platform.json"]


def test_a_wrong_mode_is_fixed_without_rewriting_the_file(tmp_path):
    _write(tmp_path)
    os.chmod(tmp_path / "root-ca.key", 0o644)  # a private key readable by all
    os.chmod(tmp_path / "platform.json", 0o600)
    os.chmod(tmp_path, 0o755)
    inode = (tmp_path / "root-ca.key").stat().st_ino
    checked = _write(tmp_path, check=True)
    assert checked["changed"] is True and checked["written"] == ["root-ca.key", "platform.json"]
    assert _mode(tmp_path / "root-ca.key") == 0o644 and _mode(tmp_path) == 0o755
    result = _write(tmp_path)
    assert result["changed"] is True and result["written"] == ["root-ca.key", "platform.json"]
    assert _mode(tmp_path / "root-ca.key") == 0o600 and _mode(tmp_path / "platform.json") == 0o644
    assert _mode(tmp_path) == 0o700
    assert (tmp_path / "root-ca.key").stat().st_ino == inode
    assert _on_disk(tmp_path) == {name: (text, MODES[name]) for name, text in FILES.items()}


def test_only_the_folder_s_mode_is_a_change_too(tmp_path):
    _write(tmp_path)
    os.chmod(tmp_path, 0o750)
    result = _write(tmp_path)
    assert result["changed"] is True and result["written"] == []
    assert _mode(tmp_path) == 0o700


def test_check_mode_writes_nothing_over_changed_files(tmp_path):
    _write(tmp_path)
    (tmp_path / "attestation.key").write_text("another key\n")
    os.chmod(tmp_path / "attestation.key", 0o640)
    result = _write(tmp_path, check=True)
    assert result["changed"] is True and result["written"] == ["attestation.key"]
    assert (tmp_path / "attestation.key").read_text() == "another key\n"
    assert _mode(tmp_path / "attestation.key") == 0o640


def test_the_diff_names_the_files_and_never_shows_a_content(tmp_path):
    dest = tmp_path / "tdx-sim"
    created = _write(dest, diff=True)
    assert created["diff"]["before"] == f"{dest}/: absent\n" + "".join(f"{name}: absent\n" for name in FILES)
    assert created["diff"]["after"] == f"{dest}/: folder 0700\n" + "".join(
        f"{name}: mode {MODES[name]:04o}, <hidden>\n" for name in FILES)
    (dest / "root-ca.key").write_text("an old key\n")
    changed = _write(dest, diff=True, check=True)
    assert changed["diff"] == {"before": "root-ca.key: mode 0600, <hidden>\n",
                               "after": "root-ca.key: mode 0600, <hidden, changed>\n"}
    for result in (created, changed):
        for text in list(FILES.values()) + ["an old key"]:
            assert text.strip() not in result.raw
        for secret in SECRETS:
            assert secret not in result.raw


@pytest.mark.parametrize("name", ["../escape.key", "a/b.crt", "..", "ABSOLUTE", "", "sub/../x"])
def test_a_name_that_is_not_a_file_of_the_folder_is_refused_before_anything_is_written(tmp_path, name):
    # Every name, were it not refused, points inside tmp_path (an absolute one too): a broken check
    # must not write over a file of the machine.
    name = str(tmp_path / "absolute.key") if name == "ABSOLUTE" else name
    dest = tmp_path / "tdx-sim"
    result = run_module("sim_platform", {"path": str(dest), "files": dict(FILES, **{name: "text\n"})})
    assert result.get("failed") and result["field"] == "files", result.raw
    assert result["msg"].startswith("files: ")
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # not even the good files
    for secret in SECRETS:
        assert secret not in result.raw


def test_a_value_that_is_not_text_is_refused(tmp_path):
    result = run_module("sim_platform", {"path": str(tmp_path / "d"), "files": {"platform.json": {"a": 1}}})
    assert result.get("failed") and result["field"] == "files" and "platform.json" in result["msg"], result.raw
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """A real simulated TDX installation's state directory (tdx_sim makes its PKI)."""
    pytest.importorskip("cryptography")
    folder = tmp_path_factory.mktemp("kms") / "tdx-sim"
    tdx_sim.SimTdx(str(folder))
    return folder


def test_info_reads_the_platform_files_and_the_copy_is_the_same_platform(platform, tmp_path):
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in platform.iterdir()}
    info = run_module("sim_platform_info", {"path": str(platform)})
    assert not info.get("failed"), info.raw
    assert info["changed"] is False
    assert list(info["files"]) == list(tdx_sim.PLATFORM_FILES)
    assert info["files"] == {name: (platform / name).read_text() for name in tdx_sim.PLATFORM_FILES}
    assert info["files"]["attestation.key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in platform.iterdir()} == before

    dest = tmp_path / "vmm-tdx-sim"
    written = _write(dest, info["files"])
    assert written["written"] == list(tdx_sim.PLATFORM_FILES)
    for name in tdx_sim.PLATFORM_FILES:
        assert (dest / name).read_bytes() == (platform / name).read_bytes()
        assert _mode(dest / name) == (0o600 if name.endswith(".key") else 0o644)
    # The copy is the same installation: its PKI loads and its root is the KMS host's.
    copy = tdx_sim.SimTdx.existing(str(dest))
    assert (dest / "root-ca.crt").read_bytes() == (platform / "root-ca.crt").read_bytes()
    assert copy.state_dir == str(dest)


def test_info_reads_the_names_given_in_check_mode_too(platform):
    info = run_module("sim_platform_info", {"path": str(platform), "names": ["platform.json", "pck.crt"]}, check=True)
    assert not info.get("failed"), info.raw
    assert info["files"] == {"platform.json": (platform / "platform.json").read_text(),
                             "pck.crt": (platform / "pck.crt").read_text()}


def test_info_fails_naming_a_missing_file(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    result = run_module("sim_platform_info", {"path": str(tmp_path), "names": list(FILES) + ["pck.key"]})
    assert result.get("failed") and result["field"] == "names", result.raw
    assert f"{tmp_path}/pck.key" in result["msg"] and "No such file" in result["msg"]
    assert "files" not in result
    for secret in SECRETS:
        assert secret not in result.raw


def test_info_fails_naming_a_missing_folder(tmp_path):
    result = run_module("sim_platform_info", {"path": str(tmp_path / "nowhere")})
    assert result.get("failed") and result["field"] == "path" and "nowhere" in result["msg"], result.raw


@pytest.mark.parametrize("name", ["../root-ca.key", "x/platform.json", ".."])
def test_info_refuses_a_name_outside_the_folder(tmp_path, name):
    (tmp_path / "root-ca.key").write_text(FILES["root-ca.key"])
    folder = tmp_path / "tdx-sim"
    folder.mkdir()
    result = run_module("sim_platform_info", {"path": str(folder), "names": ["platform.json", name]})
    assert result.get("failed") and result["field"] == "names" and repr(name) in result["msg"], result.raw
    assert SECRETS[0] not in result.raw


def test_the_kms_role_default_is_the_simulator_s_file_list(platform):
    defaults = yaml.safe_load((ROOT / "roles" / "kms" / "defaults" / "main.yml").read_text())
    assert defaults["dstack_kms_sim_state_files"] == list(tdx_sim.PLATFORM_FILES)
    # ... and the files the simulator makes, besides its TD measurements and its lock files.
    made = {path.name for path in platform.iterdir()} - {tdx_sim.RTMRS_FILE, tdx_sim.PKI_LOCK, tdx_sim.RTMRS_LOCK}
    assert made == set(tdx_sim.PLATFORM_FILES)
