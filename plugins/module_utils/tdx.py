# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""TEE providers: one interface for real Intel TDX and the simulator, so callers never branch.

    provider = open_provider("auto", sim_state_dir=...)   # "tdx" when the hardware is there
    quote = provider.get_quote(report_data)              # report_data: at most 64 bytes, zero-padded
    provider.extend_rtmr(3, digest48)
    provider.read_rtmrs()

The real provider asks the kernel: quotes through configfs-tsm (/sys/kernel/config/tsm/report),
RTMR extension through the tdx_guest measurement files
(/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384). Both roots are parameters, so
tests lay the same files out in a temporary directory (the only mock: there is no TDX here).
"""

import errno
import os
import uuid

from ansible_collections.dstack.tee.plugins.module_utils import eventlog, quote_channel
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.eventlog import RTMR_SIZE, check_rtmr_args
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_bytes
from ansible_collections.dstack.tee.plugins.module_utils.tdx_quote import pad_report_data

TSM_REPORT_DIR = "/sys/kernel/config/tsm/report"
TDX_MEASUREMENTS_DIR = "/sys/devices/virtual/misc/tdx_guest/measurements"
PROVIDERS = ("auto", "tdx", "sim")


class TdxProvider:
    """Intel TDX through the Linux kernel's configfs-tsm and tdx_guest interfaces."""

    attestation_mode = "dstack-tdx"

    def __init__(self, tsm_dir=TSM_REPORT_DIR, measurements_dir=TDX_MEASUREMENTS_DIR, make_entry=os.mkdir):
        self.tsm_dir = tsm_dir
        self.measurements_dir = measurements_dir
        # configfs fills a new report entry with its attribute files at mkdir; tests that lay
        # configfs out in a temporary directory pass a make_entry that does the same.
        self._make_entry = make_entry

    @classmethod
    def available(cls, tsm_dir=TSM_REPORT_DIR):
        return os.path.isdir(tsm_dir)

    def get_quote(self, report_data):
        inblob = pad_report_data(report_data)
        entry = os.path.join(self.tsm_dir, "dstack-" + uuid.uuid4().hex)
        try:
            self._make_entry(entry)
        except OSError as exc:
            raise DstackError("tdx", f"cannot make a configfs-tsm report entry in {self.tsm_dir}: {exc.strerror}") from None
        try:
            provider = _read_text(os.path.join(entry, "provider"), "tdx").strip()
            if provider and provider != "tdx_guest":
                raise DstackError("tdx", f"configfs-tsm provider is {provider!r}, not tdx_guest")
            generation = _read_text(os.path.join(entry, "generation"), "tdx").strip()
            with open(os.path.join(entry, "inblob"), "wb") as handle:
                handle.write(inblob)
            quote = read_bytes(os.path.join(entry, "outblob"), "tdx")
            # A changed generation means another writer touched this entry between our write and read.
            if _read_text(os.path.join(entry, "generation"), "tdx").strip() != _next_generation(generation):
                raise DstackError("tdx", "the configfs-tsm report entry was changed by another writer; try again")
            if not quote:
                raise DstackError("tdx", "the kernel returned an empty quote")
            return quote
        finally:
            _remove_entry(entry)

    def extend_rtmr(self, index, digest):
        check_rtmr_args(index, digest)
        path = os.path.join(self.measurements_dir, f"rtmr{index}:sha384")
        try:
            with open(path, "wb") as handle:
                handle.write(bytes(digest))
        except OSError as exc:
            raise DstackError("tdx", f"cannot extend RTMR{index} through {path}: {exc.strerror}") from None

    def read_rtmrs(self):
        values = []
        for index in range(4):
            value = read_bytes(os.path.join(self.measurements_dir, f"rtmr{index}:sha384"), "tdx")
            if len(value) != RTMR_SIZE:
                raise DstackError("tdx", f"RTMR{index} reads as {len(value)} bytes, expected {RTMR_SIZE}")
            values.append(value)
        return values


def _next_generation(before):
    try:
        return str(int(before) + 1)
    except ValueError:
        return before


def _read_text(path, field):
    # configfs attributes: short ASCII, whatever the kernel writes is shown, never refused.
    return read_bytes(path, field).decode("ascii", "replace")


def _remove_entry(entry):
    try:
        os.rmdir(entry)
    except OSError as exc:
        # configfs removes the entry's attribute files itself; a plain directory (tests) may hold them.
        if exc.errno == errno.ENOTEMPTY:
            for name in os.listdir(entry):
                os.unlink(os.path.join(entry, name))
            os.rmdir(entry)


def open_provider(kind="auto", sim_state_dir=None, tsm_dir=TSM_REPORT_DIR, measurements_dir=TDX_MEASUREMENTS_DIR,
                  rtmr_state=None):
    """The TEE provider: "tdx", "sim", or "auto" (tdx when configfs-tsm is there, else sim).
    rtmr_state: the simulated TD's own RTMR file (SimTdx), for a CVM on a shared simulated platform.
    In a VM without TDX whose host serves quotes on the `org.dstack.quote` virtio-serial port
    (quote_channel: the libvirt backend's no_tee VMs), "auto" and "sim" without a sim_state_dir
    take quotes from the host there."""
    if kind not in PROVIDERS:
        raise DstackError("tee", f"unknown provider {str(kind)[:20]!r} (expected one of {', '.join(PROVIDERS)})")
    if kind == "tdx" or (kind == "auto" and TdxProvider.available(tsm_dir)):
        return TdxProvider(tsm_dir, measurements_dir)
    if not sim_state_dir:
        port = quote_channel.find_port()
        if port:
            return quote_channel.ChannelQuoteProvider(port, rtmr_state or quote_channel.DEFAULT_RTMR_STATE)
        raise DstackError("sim_state_dir", "is required for the simulated TEE")
    # Imported here: the simulator needs cryptography, the real provider does not.
    from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # pylint: disable=import-outside-toplevel
    return SimTdx(sim_state_dir, rtmr_state=rtmr_state)


def emit_runtime_event(provider, event, runtime_log_path, version=1):
    """Extend RTMR3 with a runtime event and append it to the runtime event log, in that order.

    The log line is written after the extend, so a crash between the two leaves RTMR3 ahead of
    the log (a verifier then refuses the boot) rather than a log that claims an unmeasured event.
    """
    provider.extend_rtmr(eventlog.RTMR3, event.digest(version))
    with open(runtime_log_path, "a", encoding="utf-8") as handle:
        handle.write(event.to_runtime_line() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
