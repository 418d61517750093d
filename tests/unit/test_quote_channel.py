"""quote_channel: a no_tee VM's quotes from the host over its virtio-serial port.

The host side is the real QuoteChannelServer connecting to a unix socket that listens as QEMU's
`<channel type='unix'><source mode='bind'>` does; the guest's port is a real character device (a
pty in raw mode), and what QEMU does between the two (carry bytes) is a relay thread here. The VM
boot test (test_guest_boot) runs the same code with QEMU in the middle.
"""

import json
import os
import pty
import socket
import threading
import tty

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import attestation, eventlog, quote_channel, tdx, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx, launch_measurements

IMAGE_HASH = "ab" * 32
VM_CONFIG = json.dumps({"os_image_hash": IMAGE_HASH, "cpu_count": 2, "memory_size": 2 << 30}, sort_keys=True)


class FakeQemu:
    """QEMU's two ends of a virtio-serial port: a listening unix socket (the host side) and a pty
    (the guest's /dev/vportNpM). Bytes go through unchanged, both ways."""

    def __init__(self, tmp_path):
        self.socket_path = str(tmp_path / "quote.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path)
        self.listener.listen(1)
        self.master, slave = pty.openpty()
        tty.setraw(slave)
        self.device = os.ttyname(slave)
        self._slave = slave   # kept open: a pty whose last slave closes hangs up
        self.conn = None
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self):
        self.conn, _addr = self.listener.accept()
        threading.Thread(target=self._copy_to_guest, daemon=True).start()
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.conn.sendall(data)

    def _copy_to_guest(self):
        while True:
            data = self.conn.recv(65536)
            if not data:
                return
            os.write(self.master, data)

    def close(self):
        for closer in (self.listener.close, lambda: os.close(self.master), lambda: os.close(self._slave)):
            try:
                closer()
            except OSError:
                pass
        if self.conn is not None:
            self.conn.close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return SimTdx(str(tmp_path_factory.mktemp("sim")))


@pytest.fixture
def vm(tmp_path, sim):
    qemu = FakeQemu(tmp_path)
    server = quote_channel.QuoteChannelServer(
        qemu.socket_path, quote_channel.QuoteService(sim, launch_measurements(VM_CONFIG), name="t")).start()
    guest = quote_channel.ChannelQuoteProvider(qemu.device, rtmr_state=str(tmp_path / "guest" / "rtmrs.json"),
                                               timeout=10)
    yield guest
    server.close()
    qemu.close()


def verify(sim, quote):
    verification = attestation.verify_quote(quote, sim.collateral(), root_ca_der=sim.root_ca_der)
    assert verification.ok, verification.failures
    return tdx_quote.parse_quote(quote).report


def test_a_quote_carries_the_hosts_launch_measurements_and_the_guests_rtmr3(vm, sim):
    launch = launch_measurements(VM_CONFIG)
    rtmrs = vm.read_rtmrs()
    assert rtmrs[:3] == [launch["rtmr0"], launch["rtmr1"], launch["rtmr2"]]
    assert rtmrs[3] == bytes(48)
    event = eventlog.RuntimeEvent("os-image-hash", bytes.fromhex(IMAGE_HASH))
    vm.extend_rtmr(3, event.digest(1))
    expected_rtmr3 = eventlog.extend(bytes(48), event.digest(1))
    assert vm.read_rtmrs()[3] == expected_rtmr3

    report = verify(sim, vm.get_quote(b"\x07" * 64))
    assert report.report_data == b"\x07" * 64
    assert report.mr_td == launch["mr_td"]
    assert (report.rtmr0, report.rtmr1, report.rtmr2) == (launch["rtmr0"], launch["rtmr1"], launch["rtmr2"])
    assert report.rtmr3 == expected_rtmr3
    # Another image's launch measurements differ: the quote names the image the VMM booted.
    assert launch_measurements(VM_CONFIG.replace("ab", "cd"))["mr_td"] != report.mr_td


def test_the_guest_cannot_choose_its_launch_measurements(vm, sim, tmp_path):
    """RTMR0-2 and MRTD are the host's: a request naming them is answered with the launch values,
    and the provider refuses to extend them."""
    with pytest.raises(DstackError, match="only RTMR3"):
        vm.extend_rtmr(1, b"\x01" * 48)
    answer = vm._ask({"op": "quote", "report_data": "00" * 64, "rtmr3": "11" * 48,  # pylint: disable=protected-access
                      "mr_td": "22" * 48, "rtmr0": "33" * 48, "rtmr1": "44" * 48, "rtmr2": "55" * 48})
    report = verify(sim, bytes.fromhex(answer["quote"]))
    launch = launch_measurements(VM_CONFIG)
    assert report.mr_td == launch["mr_td"] and report.rtmr0 == launch["rtmr0"] and report.rtmr2 == launch["rtmr2"]
    assert report.rtmr3 == b"\x11" * 48


def test_bad_requests_are_answered_with_errors_and_the_service_keeps_serving(vm):
    for bad, reason in (({"op": "sign-anything"}, "unknown operation"),
                        ({"op": "quote", "report_data": "zz", "rtmr3": "00" * 48}, "report_data"),
                        ({"op": "quote", "report_data": "00" * 64, "rtmr3": "00" * 47}, "rtmr3")):
        with pytest.raises(DstackError, match=reason):
            vm._ask(bad)  # pylint: disable=protected-access
    assert len(vm.read_rtmrs()) == 4


def test_noise_on_the_port_is_skipped(vm, sim, tmp_path):
    """Half lines and answers to someone else's request (a restarted agent's) are not taken."""
    service = quote_channel.QuoteService(sim, launch_measurements(VM_CONFIG))
    assert service.answer(b"{not json") is None
    assert service.answer(b'"a string"') is None
    assert service.answer(b'{"op": "launch"}') is None          # no id: nobody to answer
    assert json.loads(service.answer(b'{"op": "launch", "id": "x"}'))["id"] == "x"
    assert vm.get_quote(b"")


def test_no_host_service_is_a_clear_error(tmp_path):
    qemu = FakeQemu(tmp_path)   # nobody connects to its socket
    try:
        guest = quote_channel.ChannelQuoteProvider(qemu.device, rtmr_state=str(tmp_path / "r.json"), timeout=0.5)
        with pytest.raises(DstackError, match="no answer from the host's quote service"):
            guest.read_rtmrs()
        assert not os.path.exists(tmp_path / "r.json")
    finally:
        qemu.close()


def test_the_port_is_found_by_its_name_in_sysfs(tmp_path, monkeypatch):
    ports = tmp_path / "virtio-ports"
    for port, name in (("vport0p0", "org.qemu.guest_agent.0"), ("vport1p1", quote_channel.PORT_NAME)):
        (ports / port).mkdir(parents=True)
        (ports / port / "name").write_text(name + "\n")
    assert quote_channel.find_port(str(ports)) == "/dev/vport1p1"
    assert quote_channel.find_port(str(tmp_path / "none")) is None
    # tdx.open_provider("auto") without configfs-tsm and without a sim state takes the channel.
    monkeypatch.setattr(quote_channel, "VIRTIO_PORTS_DIR", str(ports))
    monkeypatch.setattr(quote_channel.find_port, "__defaults__", (str(ports), "/dev"))
    provider = tdx.open_provider("auto", tsm_dir=str(tmp_path / "no-tsm"), rtmr_state=str(tmp_path / "w" / "r.json"))
    assert isinstance(provider, quote_channel.ChannelQuoteProvider)
    assert provider.device == "/dev/vport1p1" and provider.rtmr_state == str(tmp_path / "w" / "r.json")
    (ports / "vport1p1" / "name").write_text("something.else\n")
    with pytest.raises(DstackError, match="sim_state_dir"):
        tdx.open_provider("auto", tsm_dir=str(tmp_path / "no-tsm"))
