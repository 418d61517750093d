"""The libvirt backend's simulated TEE for no_tee VMs: the domain's org.dstack.quote channel, the
quote service the backend runs on its host end, and the os_image_hash read from the image.

On libvirt's test driver (no QEMU), this test listens on the channel's socket as QEMU would; the
guest boot test (test_guest_boot) has QEMU and the real guest there.
"""

import json
import os
import pathlib
import shutil
import socket
import tempfile
import time
import uuid

import pytest

from ansible_collections.dstack.tee.agents.vmm.backends.base import VmRecord
from ansible_collections.dstack.tee.agents.vmm.backends.libvirt import LibvirtBackend
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as ac
from ansible_collections.dstack.tee.plugins.module_utils import attestation, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx, launch_measurements

DIGEST = "5e" * 32


def make_image(folder):
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"kernel": "bzImage", "cmdline": "console=ttyS0"}))
    (folder / "digest.txt").write_text(DIGEST + "\n")


def make_vm(run_path, no_tee=True):
    vm_id = str(uuid.uuid4())
    run_dir = os.path.join(run_path, vm_id)
    os.makedirs(os.path.join(run_dir, "shared"))
    data = ac.render(ac.build("services:\n  web:\n    image: nginx\n", "hello"))
    with open(os.path.join(run_dir, "shared", "app-compose.json"), "wb") as handle:
        handle.write(data)
    manifest = {"id": vm_id, "name": "hello", "app_id": ac.compose_hash(data)[:40], "vcpu": 1, "memory": 256,
                "disk_size": 1, "image": "guest", "port_map": [], "no_tee": no_tee}
    return VmRecord(vm_id, run_dir, manifest)


def ask(conn, request):
    conn.sendall((json.dumps(request) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        assert chunk, "the backend's quote service hung up"
        buf += chunk
    return json.loads(buf)


@pytest.fixture
def short_path():
    """A run path short enough for unix sockets (pytest's tmp_path may not be)."""
    path = tempfile.mkdtemp(prefix="lvq-", dir="/tmp")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_a_no_tee_vm_gets_quotes_naming_its_image_from_the_backend(tmp_path, short_path):
    make_image(tmp_path / "images" / "guest")
    sim_dir = str(tmp_path / "tdx-sim")
    sim = SimTdx(sim_dir)
    backend = LibvirtBackend("test:///default", image_dir=str(tmp_path / "images"), vsock=False, sim_state_dir=sim_dir)
    listener = None
    try:
        with pytest.raises(DstackError, match="run_path"):
            backend.domain_xml(make_vm(str(tmp_path / ("long" * 20))))
        vm = make_vm(str(short_path))
        assert backend.os_image_hash(vm) == DIGEST
        vm_config = json.dumps({"os_image_hash": backend.os_image_hash(vm), "cpu_count": 1}, sort_keys=True)
        with open(os.path.join(vm.shared_dir, ".sys-config.json"), "w", encoding="utf-8") as handle:
            json.dump({"vm_config": vm_config}, handle)
        xml = backend.domain_xml(vm)
        sock_path = os.path.join(vm.run_dir, "quote.sock")
        assert f"<source mode='bind' path='{sock_path}'/>" in xml
        assert "<target type='virtio' name='org.dstack.quote'/>" in xml

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # QEMU's end of the channel
        listener.bind(sock_path)
        listener.listen(1)
        listener.settimeout(10)
        backend.start(vm)
        conn, _addr = listener.accept()
        conn.settimeout(10)
        launch = launch_measurements(vm_config)
        assert ask(conn, {"id": "1", "op": "launch"}) == {"id": "1", **{k: v.hex() for k, v in launch.items()}}
        answer = ask(conn, {"id": "2", "op": "quote", "report_data": "42" * 64, "rtmr3": "00" * 48})
        quote = bytes.fromhex(answer["quote"])
        assert attestation.verify_quote(quote, sim.collateral(), root_ca_der=sim.root_ca_der).ok
        report = tdx_quote.parse_quote(quote).report
        assert report.mr_td == launch["mr_td"] and report.rtmr1 == launch["rtmr1"]
        assert report.mr_td != launch_measurements(vm_config.replace("5e", "5f"))["mr_td"]

        backend.stop(vm)                              # a power-off ends the VM's quote service
        deadline = time.monotonic() + 5
        while conn.recv(1) and time.monotonic() < deadline:
            pass
        conn.close()

        # A VM with TDX gets no channel: its quotes come from the TDX module and QGS.
        assert backend.spec(make_vm(str(short_path), no_tee=False)).quote_channel is None
    finally:
        if listener is not None:
            listener.close()
        backend.close()


def test_without_a_sim_state_a_no_tee_vm_has_no_quote_channel(tmp_path):
    make_image(tmp_path / "images" / "guest")
    backend = LibvirtBackend("test:///default", image_dir=str(tmp_path / "images"), vsock=False)
    try:
        assert "org.dstack.quote" not in backend.domain_xml(make_vm(str(tmp_path / "run")))
    finally:
        backend.close()


def test_list_images_names_each_image_with_its_os_image_hash(tmp_path):
    """Vmm.ListImages: the image folders with a metadata.json, each with its digest.txt (what
    deploy-app.yml allows at the KMS); a damaged one is named as such, the others still listed."""
    from ansible_collections.dstack.tee.agents.vmm.app import create_app  # pylint: disable=import-outside-toplevel
    images = tmp_path / "images"
    make_image(images / "guest")
    (images / "guest" / "metadata.json").write_text(json.dumps({"kernel": "bzImage", "version": "0.1.0"}))
    make_image(images / "broken")
    (images / "broken" / "digest.txt").write_text("not a digest\n")
    (images / "notes").mkdir()   # no metadata.json: not an image
    backend = LibvirtBackend("test:///default", image_dir=str(images), vsock=False)
    try:
        client = create_app({"run_path": str(tmp_path / "run"), "auth_tokens": ["t0ken"]}, backend).test_client()
        local = {"Host": "127.0.0.1:9080"}
        assert client.post("/prpc/Vmm.ListImages", json={}, headers=local).status_code == 401
        answer = client.post("/prpc/Vmm.ListImages", json={}, headers={**local, "Authorization": "Bearer t0ken"})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        assert answer.get_json()["images"] == [
            {"name": "broken", "version": "", "is_dev": False, "os_image_hash": "",
             "error": f"image: {images / 'broken'}/digest.txt holds no sha256 hex digest"},
            {"name": "guest", "version": "0.1.0", "is_dev": False, "os_image_hash": DIGEST, "error": ""}]
    finally:
        backend.close()
