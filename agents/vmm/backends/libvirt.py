# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The `libvirt` backend: each CVM is a libvirt domain (a TDX guest, or a plain KVM VM with no_tee).

The domain is rendered by plugins/module_utils/libvirt_domain.py from the VM's manifest and its
guest image (dstack-reference 2.4: <image_dir>/<image>/metadata.json names kernel, initrd, bios,
rootfs and cmdline, relative to that directory). Per VM the backend keeps, in the run directory:

    hda.img      the data disk, `qemu-img create -f qcow2` of disk_size GB (a sparse raw file of
                 that size when qemu-img is not installed; its format is read back from the file)
    serial.log   the serial console, written by libvirt (virtlogd)
    quote.sock   (no_tee, with a sim_state_dir) the host end of the VM's `org.dstack.quote`
                 virtio-serial port: QEMU listens, the backend's QuoteChannelServer answers the
                 guest's quote requests with the simulated platform's keys and the launch
                 measurements of the vm_config the VMM wrote to the share (quote_channel.py)

The domain is named dstack-<vm id> (its UUID is the VM id, its title the VM name), its MAC comes
from the VM id, and its vsock CID from a pool (cid_start, cid_pool_size: dstack's defaults 1000
and 1000), kept across redefinitions. mrconfigid comes from the share's app-compose.json and the
manifest's app_id. Port forwards need libvirt's passt backend (libvirt 9.2 or later).
"""

import json
import os
import re
import shutil
import subprocess

from ansible_collections.dstack.tee.agents.vmm.backends.base import EXITED, RUNNING, STOPPED, STOPPING, Backend
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_domain as ld
from ansible_collections.dstack.tee.plugins.module_utils import quote_channel
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_bytes, read_json

_IMAGE_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_CID_RE = re.compile(r"<cid\b[^>]*\baddress='(\d+)'")
QCOW2_MAGIC = b"QFI\xfb"


class LibvirtBackend(Backend):
    name = "libvirt"

    def __init__(self, uri="qemu:///system", image_dir="images", domain_prefix="dstack-", vsock=None,
                 cid_start=1000, cid_pool_size=1000, domain_type="kvm", qgs_socket=ld.DEFAULT_QGS_SOCKET,
                 qemu_img=None, sim_state_dir=None):
        """`vsock`: True/False, or None to give guests a vsock device when /dev/vhost-vsock exists.
        `sim_state_dir`: the simulated TDX platform that signs the quotes of no_tee VMs (none: such
        VMs get no quote channel)."""
        self.uri = uri
        self.image_dir = os.path.abspath(image_dir)
        self.domain_prefix = domain_prefix
        self.vsock = os.path.exists("/dev/vhost-vsock") if vsock is None else bool(vsock)
        self.cid_start = cid_start
        self.cid_pool_size = cid_pool_size
        self.domain_type = domain_type
        self.qgs_socket = qgs_socket
        self.qemu_img = qemu_img if qemu_img is not None else shutil.which("qemu-img")
        self.sim_state_dir = sim_state_dir
        self._conn = None
        self._channels = {}   # vm id -> QuoteChannelServer

    # ---- connection and names ---------------------------------------------------------------

    @property
    def conn(self):
        """One connection for the backend's life (test:///default keeps its state only that long)."""
        if self._conn is None or not self._conn.isAlive():
            self._conn = lv.connect(self.uri)
        return self._conn

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def domain_name(self, vm):
        return self.domain_prefix + vm.id

    def _domain(self, vm):
        return lv.lookup(self.conn, self.domain_name(vm))

    # ---- what the domain is made of ---------------------------------------------------------

    def _image_folder(self, vm):
        name = vm.manifest.get("image") or ""
        if not _IMAGE_NAME_RE.match(name):
            raise DstackError("image", f"is not an image name: {name[:60]!r}")
        return os.path.join(self.image_dir, name)

    def image(self, vm):
        """The guest image's metadata.json, with its file names made absolute paths."""
        folder = self._image_folder(vm)
        meta_path = os.path.join(folder, "metadata.json")
        try:
            with open(meta_path, encoding="utf-8") as handle:
                meta = json.load(handle)
        except OSError as exc:
            raise DstackError("image", f"cannot read {meta_path}: {exc.strerror}") from None
        except ValueError as exc:
            raise DstackError("image", f"{meta_path} is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise DstackError("image", f"{meta_path} is not a JSON object")
        out = dict(meta)
        for key in ("kernel", "initrd", "bios", "rootfs"):
            if meta.get(key):
                out[key] = os.path.join(folder, meta[key])
        return out

    def os_image_hash(self, vm):
        """digest.txt of the VM's image: sha256 of its sha256sum.txt, dstack's os_image_hash ("" for
        an image without one: the VMM's configured os_image_hash then)."""
        folder = self._image_folder(vm)
        raw = read_bytes(os.path.join(folder, "digest.txt"), "image", missing_ok=True)
        if raw is None:
            return ""
        text = raw.decode("ascii", "replace").strip()
        if not re.fullmatch(r"[0-9a-f]{64}", text):
            raise DstackError("image", f"{folder}/digest.txt holds no sha256 hex digest")
        return text

    def _data_disk(self, vm):
        """hda.img, made once: (path, format)."""
        path = os.path.join(vm.run_dir, "hda.img")
        if not os.path.exists(path):
            size_gb = int(vm.manifest.get("disk_size", 10))
            if self.qemu_img:
                subprocess.run([self.qemu_img, "create", "-q", "-f", "qcow2", path, f"{size_gb}G"],
                               check=True, capture_output=True)
            else:  # no qemu-img: a sparse raw file of the same size
                with open(path, "wb") as handle:
                    handle.truncate(size_gb * 1024 ** 3)
        with open(path, "rb") as handle:
            return path, "qcow2" if handle.read(4) == QCOW2_MAGIC else "raw"

    def _cid(self, vm, dom):
        """The VM's vsock CID: the one its domain has, else the first free one of the pool."""
        if dom is not None:
            found = _CID_RE.search(lv.current_xml(dom))
            if found:
                return int(found.group(1))
        used = set()
        for other in lv.list_domains(self.conn):
            used.update(int(cid) for cid in _CID_RE.findall(lv.current_xml(other)))
        for cid in range(self.cid_start, self.cid_start + self.cid_pool_size):
            if cid not in used:
                return cid
        raise DstackError("cid", f"no free vsock CID in {self.cid_start}..{self.cid_start + self.cid_pool_size - 1}")

    def spec(self, vm, dom=None):
        """The DomainSpec of a VM (reads the image metadata and the share; makes hda.img)."""
        meta = self.image(vm)
        no_tee = bool(vm.manifest.get("no_tee"))
        mrconfigid = None
        if not no_tee:
            try:
                with open(os.path.join(vm.shared_dir, "app-compose.json"), "rb") as handle:
                    compose_bytes = handle.read()
            except OSError as exc:
                raise DstackError("app-compose.json", f"cannot read it from the share: {exc.strerror}") from None
            mrconfigid = ld.mrconfigid_for(compose_bytes, vm.manifest.get("app_id") or None)
        disk, disk_format = self._data_disk(vm)
        return ld.DomainSpec(
            name=self.domain_name(vm), uuid=vm.id, title=vm.name or None, kernel=meta.get("kernel"),
            vcpu=vm.manifest.get("vcpu", 1), memory_mb=vm.manifest.get("memory", 1024),
            ovmf=meta.get("bios"), initrd=meta.get("initrd"), cmdline=meta.get("cmdline", ""),
            rootfs=meta.get("rootfs"), data_disk=disk, data_disk_format=disk_format,
            shared_dir=os.path.abspath(vm.shared_dir), cid=self._cid(vm, dom) if self.vsock else None,
            mac=ld.mac_for(vm.id),
            port_forwards=tuple((p.get("protocol", "tcp"), p.get("host_address") or "127.0.0.1",
                                 p["host_port"], p["vm_port"]) for p in vm.port_map),
            mrconfigid=mrconfigid, no_tee=no_tee, qgs_socket=self.qgs_socket,
            serial_log=os.path.abspath(vm.serial_log), domain_type=self.domain_type,
            quote_channel=self._quote_socket(vm) if no_tee and self.sim_state_dir else None)

    @staticmethod
    def _quote_socket(vm):
        path = os.path.abspath(os.path.join(vm.run_dir, "quote.sock"))
        if len(path.encode()) > 107:   # sun_path holds 108 bytes with its NUL
            raise DstackError("run_path", f"is too long for the VM's quote socket {path} (at most 107 bytes)")
        return path

    def _ensure_channel(self, vm):
        """The quote service of a running no_tee VM (started again after a VMM restart)."""
        if not (self.sim_state_dir and vm.manifest.get("no_tee")):
            return
        server = self._channels.get(vm.id)
        if server is not None and server.alive:
            return
        # Imported here: the simulator needs cryptography, which the TDX path does not.
        from ansible_collections.dstack.tee.plugins.module_utils import tdx_sim  # pylint: disable=import-outside-toplevel
        sys_config = read_json(os.path.join(vm.shared_dir, ".sys-config.json"), ".sys-config.json")
        vm_config = sys_config.get("vm_config", "") if isinstance(sys_config, dict) else ""
        service = quote_channel.QuoteService(tdx_sim.SimTdx(self.sim_state_dir),
                                             tdx_sim.launch_measurements(vm_config), name=vm.id)
        self._channels[vm.id] = quote_channel.QuoteChannelServer(self._quote_socket(vm), service).start()

    def _drop_channel(self, vm):
        server = self._channels.pop(vm.id, None)
        if server is not None:
            server.close()

    def domain_xml(self, vm, dom=None):
        return ld.render_domain_xml(self.spec(vm, dom))

    # ---- lifecycle ----------------------------------------------------------------------------

    def create(self, vm):
        """Define the domain, or redefine it when its definition differs (a running VM picks the
        new definition up at its next start)."""
        dom = self._domain(vm)
        xml = self.domain_xml(vm, dom)
        if dom is not None and ld.normalized_current(lv.current_xml(dom), xml) == xml:
            return dom
        return lv.define(self.conn, xml)

    def start(self, vm):
        dom = self._domain(vm) or self.create(vm)
        self._drop_channel(vm)   # the vm_config may have changed since the last start
        lv.start(dom)
        self._ensure_channel(vm)

    def stop(self, vm, force=True):
        dom = self._domain(vm)
        if force:
            self._drop_channel(vm)
            if dom is not None:
                lv.destroy(dom)
        elif dom is not None:
            lv.shutdown(dom)

    def remove(self, vm):
        self._drop_channel(vm)
        dom = self._domain(vm)
        if dom is not None:
            lv.remove(dom)
        disk = os.path.join(vm.run_dir, "hda.img")
        if os.path.exists(disk):
            os.unlink(disk)

    def status(self, vm):
        dom = self._domain(vm)
        if dom is None:
            return STOPPED
        name, reason = lv.state(dom)
        if name == "shutdown":
            return STOPPING
        if name in lv.ACTIVE_STATES:
            self._ensure_channel(vm)
            return RUNNING
        if name == "crashed" or (name == "shutoff" and reason in lv.SHUTOFF_BY_GUEST):
            return EXITED
        return STOPPED
