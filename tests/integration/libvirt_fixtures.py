"""The real libvirt daemon for the tests (qemu:///system), and folders its QEMU can read.

- `system_libvirt` (session): the URI of qemu:///system, starting virtlogd and libvirtd when they
  are not running (machine-recipes.md) and leaving them running, as a host's libvirt; it skips
  only when it cannot (not root, or libvirt's daemon not installed).
- `host_dir`: a folder under /var/tmp that libvirt's qemu user can reach (pytest's tmp_path is
  private to root), removed after the test.
- `system_domains`: a name maker for domains on qemu:///system; whatever a test leaves defined
  is removed after it.

Import the fixtures into a test module: `from libvirt_fixtures import system_libvirt  # noqa: F401`.
"""

import grp
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv

SYSTEM_URI = "qemu:///system"
VIRTLOGD, LIBVIRTD = "/usr/sbin/virtlogd", "/usr/sbin/libvirtd"


def connects(uri):
    """Whether libvirt answers at `uri`."""
    try:
        lv.connect(uri).close()
        return True
    except lv.LibvirtFailure:
        return False


@pytest.fixture(scope="session")
def system_libvirt():
    """qemu:///system, starting virtlogd and libvirtd when they are not running (left running)."""
    if connects(SYSTEM_URI):
        return SYSTEM_URI
    if os.geteuid() != 0:
        pytest.skip("qemu:///system is not running and starting libvirtd needs root")
    for exe in (VIRTLOGD, LIBVIRTD):
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{exe} is not installed (scripts/setup.sh --test installs libvirt-daemon-system)")
    if os.path.exists("/dev/kvm"):                           # machine-recipes.md: qemu runs as libvirt-qemu
        os.chown("/dev/kvm", -1, grp.getgrnam("kvm").gr_gid)
        os.chmod("/dev/kvm", 0o660)
    for exe in (VIRTLOGD, LIBVIRTD):
        subprocess.run([exe, "-d"], check=False, capture_output=True, timeout=30)
    deadline = time.monotonic() + 20
    while not connects(SYSTEM_URI):
        assert time.monotonic() < deadline, "libvirtd did not come up (see /var/log/libvirt/)"
        time.sleep(0.2)
    return SYSTEM_URI


@pytest.fixture
def host_dir():
    """A folder libvirt's qemu user can reach (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="dstack-tee-libvirt-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def system_domains(system_libvirt):  # pylint: disable=redefined-outer-name
    """Names for domains on qemu:///system; whatever a test leaves defined is removed after it."""
    names = []

    def new(prefix="dstack-tee-test-"):
        names.append(prefix + uuid.uuid4().hex[:8])
        return names[-1]
    yield new
    conn = lv.connect(system_libvirt)
    for name in names:
        dom = lv.lookup(conn, name)
        if dom is not None:
            lv.remove(dom)
    conn.close()
