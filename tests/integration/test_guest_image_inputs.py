"""scripts/build-guest-image.sh's inputs, without a build: --print-inputs gives the cache key, which
the firmware is part of (--firmware puts another file in the image: a TDX build of OVMF on a real
host), and a bad --firmware is refused before anything is read or built.

Needs root and the Debian mirror (the key holds its package indexes' hashes), as test_guest_image
does; no skip.
"""

import re
import shutil
import subprocess

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "build-guest-image.sh"
DEBIAN_OVMF = "/usr/share/OVMF/OVMF_CODE.fd"


def print_inputs(*args, cache):
    proc = subprocess.run([str(SCRIPT), "--print-inputs", "--cache", str(cache), *map(str, args)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key), proc.stdout
    assert f"inputs hash {key}" in proc.stderr
    return key


def test_the_firmware_is_an_input_and_print_inputs_builds_nothing(tmp_path):
    cache = tmp_path / "cache"
    default = print_inputs(cache=cache)
    # The same inputs, the same key (the mirror only moves when Debian publishes: once more then).
    again = print_inputs(cache=cache)
    if again != default:
        default = print_inputs(cache=cache)
        again = print_inputs(cache=cache)
    assert again == default
    # Debian's OVMF named explicitly is still another variant ("custom" in metadata.json): another key.
    same_file = tmp_path / "ovmf-copy.fd"
    shutil.copy(DEBIAN_OVMF, same_file)
    named = print_inputs("--firmware", same_file, cache=cache)
    assert named != default
    # Another firmware file, another key.
    other = tmp_path / "tdvf.fd"
    other.write_bytes(same_file.read_bytes() + b"\0")
    assert print_inputs("--firmware", other, cache=cache) not in (default, named)
    # Nothing was built or stored.
    assert not list((cache / "images").iterdir()) and not list((cache / "work").iterdir())


def test_a_bad_firmware_is_refused_naming_the_option(tmp_path):
    empty = tmp_path / "empty.fd"
    empty.write_bytes(b"")
    for arg, why in ((tmp_path / "missing.fd", "not a readable file"), (empty, "the file is empty")):
        proc = subprocess.run([str(SCRIPT), "--firmware", str(arg), "--cache", str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1
        assert f"--firmware {arg}: {why}" in proc.stderr
        assert not (tmp_path / "cache").exists()
