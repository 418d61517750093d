"""The real TDX provider against a temporary directory laid out like configfs-tsm and tdx_guest sysfs.

This is the one mock of the project: no TDX exists here. The fake "kernel" behaves as configfs
does where it matters: a new report entry comes with its attribute files, reading `outblob`
blocks until the quote is made (a FIFO here), and `generation` counts writes to `inblob`.
"""

import hashlib
import os
import threading

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import eventlog
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.tdx import TdxProvider, emit_runtime_event, open_provider


class FakeConfigfs:
    """Makes report entries like configfs, and answers each with a 'quote' of its inblob."""

    def __init__(self, provider_name="tdx_guest", tamper_generation=False):
        self.provider_name = provider_name
        self.tamper_generation = tamper_generation
        self.threads = []
        self.inblobs = []

    def make_entry(self, path):
        os.mkdir(path)
        with open(os.path.join(path, "provider"), "w", encoding="ascii") as handle:
            handle.write(self.provider_name + "\n")
        with open(os.path.join(path, "generation"), "w", encoding="ascii") as handle:
            handle.write("0\n")
        os.mkfifo(os.path.join(path, "outblob"))
        thread = threading.Thread(target=self._answer, args=(path,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _answer(self, path):
        try:
            out = open(os.path.join(path, "outblob"), "wb")  # pylint: disable=consider-using-with  # blocks until the provider reads
        except FileNotFoundError:  # the provider refused the entry (and removed it) before reading
            return
        with out:
            with open(os.path.join(path, "inblob"), "rb") as handle:
                inblob = handle.read()
            self.inblobs.append(inblob)
            generation = "5" if self.tamper_generation else "1"
            with open(os.path.join(path, "generation"), "w", encoding="ascii") as handle:
                handle.write(generation + "\n")
            out.write(b"QUOTE:" + hashlib.sha256(inblob).digest())


@pytest.fixture
def sysfs(tmp_path):
    tsm = tmp_path / "tsm" / "report"
    meas = tmp_path / "measurements"
    tsm.mkdir(parents=True)
    meas.mkdir()
    for index in range(4):
        (meas / f"rtmr{index}:sha384").write_bytes(bytes(48))
    return tsm, meas


def test_quote_through_configfs_tsm(sysfs):
    tsm, meas = sysfs
    fake = FakeConfigfs()
    provider = TdxProvider(str(tsm), str(meas), make_entry=fake.make_entry)
    quote = provider.get_quote(b"hello")
    assert fake.inblobs == [b"hello".ljust(64, b"\0")]
    assert quote == b"QUOTE:" + hashlib.sha256(b"hello".ljust(64, b"\0")).digest()
    assert list(tsm.iterdir()) == []  # the report entry is removed afterwards
    assert provider.attestation_mode == "dstack-tdx"


def test_a_concurrent_writer_is_detected(sysfs):
    tsm, meas = sysfs
    provider = TdxProvider(str(tsm), str(meas), make_entry=FakeConfigfs(tamper_generation=True).make_entry)
    with pytest.raises(DstackError, match="another writer"):
        provider.get_quote(b"x")
    assert list(tsm.iterdir()) == []


def test_another_tsm_provider_is_refused(sysfs):
    tsm, meas = sysfs
    provider = TdxProvider(str(tsm), str(meas), make_entry=FakeConfigfs(provider_name="sev_guest").make_entry)
    with pytest.raises(DstackError, match="sev_guest"):
        provider.get_quote(b"x")


def test_report_data_over_64_bytes_is_refused(sysfs):
    tsm, meas = sysfs
    with pytest.raises(DstackError, match="^report_data: is 65 bytes"):
        TdxProvider(str(tsm), str(meas)).get_quote(b"x" * 65)


def test_rtmr_extend_writes_the_digest_to_the_measurement_file(sysfs, tmp_path):
    tsm, meas = sysfs
    provider = TdxProvider(str(tsm), str(meas))
    digest = hashlib.sha384(b"event").digest()
    provider.extend_rtmr(3, digest)
    # The kernel extends on write; a plain file just records what was written.
    assert (meas / "rtmr3:sha384").read_bytes() == digest
    assert len(provider.read_rtmrs()) == 4
    with pytest.raises(DstackError, match="48 bytes"):
        provider.extend_rtmr(3, b"short")
    with pytest.raises(DstackError, match="0 to 3"):
        provider.extend_rtmr(4, digest)
    log = tmp_path / "runtime_events.log"
    event = eventlog.RuntimeEvent("app-id", b"\x01" * 20)
    emit_runtime_event(provider, event, str(log))
    assert (meas / "rtmr3:sha384").read_bytes() == event.digest()
    assert eventlog.events_from_runtime_log(log.read_text()) == [event]


def test_auto_picks_tdx_when_configfs_tsm_is_there(sysfs, tmp_path):
    tsm, meas = sysfs
    assert isinstance(open_provider("auto", tsm_dir=str(tsm), measurements_dir=str(meas)), TdxProvider)
    with pytest.raises(DstackError, match="sim_state_dir"):
        open_provider("auto", tsm_dir=str(tmp_path / "absent"))
    with pytest.raises(DstackError, match="unknown provider"):
        open_provider("sgx")
