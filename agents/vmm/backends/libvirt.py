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
    shared/images/<name>-<hash>.tar   (preload_images) docker-archives of the compose's images the
                 host's podman holds, written before each start (podman save, to a temporary name
                 then renamed; an archive of the same image ID is kept): the guest podman-loads
                 every images/*.tar, and pulls the images the host does not have (a log line says so)

Its VMs are on QEMU's user network (<interface type='user'>), where the host's loopback is 10.0.2.2
(guest_host_address): the VMM gives them loopback URLs so. QEMU runs as libvirt's qemu user: the
run path, the VM's run directory and its share are made reachable by that user's group (run path
and run directory traverse only, the share readable: 0710, 0710, 0750), not by other users.

The domain is named dstack-<vm id> (its UUID is the VM id, its title the VM name), its MAC comes
from the VM id, and its vsock CID from a pool (cid_start, cid_pool_size: dstack's defaults 1000
and 1000), kept across redefinitions. mrconfigid comes from the share's app-compose.json and the
manifest's app_id. Port forwards need libvirt's passt backend (libvirt 9.2 or later).
"""

import grp
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import uuid

from ansible_collections.dstack.tee.agents.vmm.backends.base import EXITED, RUNNING, STOPPED, STOPPING, Backend
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils import image_archive
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_domain as ld
from ansible_collections.dstack.tee.plugins.module_utils import quote_channel
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_bytes, read_json

_IMAGE_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_CID_RE = re.compile(r"<cid\b[^>]*\baddress='(\d+)'")
QCOW2_MAGIC = b"QFI\xfb"
# QEMU's user network: the guest reaches the host's loopback at the network's gateway address.
USER_NET_HOST_ADDRESS = "10.0.2.2"
# The group libvirt's QEMU runs with (Debian: user libvirt-qemu, in its group of that name).
QEMU_GROUP = "libvirt-qemu"
IMAGES_DIR = "images"
log = logging.getLogger("dstack-vmm.libvirt")


def archive_name(image):
    """The file name of an image's archive in the share: the name made safe, plus a hash of the
    whole name so that two names made alike stay two files."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", image).strip("._-")[:80] or "image"
    return f"{safe}-{hashlib.sha256(image.encode('utf-8')).hexdigest()[:12]}.tar"


class LibvirtBackend(Backend):
    name = "libvirt"
    guest_host_address = USER_NET_HOST_ADDRESS

    def __init__(self, uri="qemu:///system", image_dir="images", domain_prefix="dstack-", vsock=None,
                 cid_start=1000, cid_pool_size=1000, domain_type="kvm", qgs_socket=ld.DEFAULT_QGS_SOCKET,
                 qemu_img=None, sim_state_dir=None, preload_images=True, image_engine="podman",
                 qemu_group=QEMU_GROUP):
        """`vsock`: True/False, or None to give guests a vsock device when /dev/vhost-vsock exists.
        `sim_state_dir`: the simulated TDX platform that signs the quotes of no_tee VMs (none: such
        VMs get no quote channel). `preload_images`: save the compose's images the host's podman
        (`image_engine`, its command) holds into the share before a start. `qemu_group`: the
        group QEMU runs with, given access to the VM's files (None, or a group this host lacks:
        nothing is changed)."""
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
        self.preload_images = preload_images
        self.image_engine = image_engine
        self.qemu_group = qemu_group
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
        return self._digest(self._image_folder(vm))

    def images(self):
        """The folders of image_dir with a metadata.json, by name, each with its os_image_hash (its
        digest.txt, which a deployer checks against its own pin: never a source of trust)."""
        try:
            names = sorted(os.listdir(self.image_dir))
        except OSError:
            return []
        found = []
        for name in filter(_IMAGE_NAME_RE.match, names):
            folder = os.path.join(self.image_dir, name)
            if not os.path.isfile(os.path.join(folder, "metadata.json")):
                continue
            entry = {"name": name, "version": "", "is_dev": False, "os_image_hash": "", "error": ""}
            try:   # one damaged image is named as such, and the others are still listed
                meta = read_json(os.path.join(folder, "metadata.json"), "image")
                if not isinstance(meta, dict):
                    raise DstackError("image", f"{folder}/metadata.json is not a JSON object")
                entry.update(version=str(meta.get("version", "")), is_dev=bool(meta.get("is_dev")),
                             os_image_hash=self._digest(folder))
            except DstackError as exc:
                entry["error"] = str(exc)
            found.append(entry)
        return found

    @staticmethod
    def _digest(folder):
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

    # ---- what QEMU reads: the share, the app's images --------------------------------------------

    def _qemu_gid(self):
        if not self.qemu_group or os.geteuid() != 0:
            return None
        try:
            return grp.getgrnam(self.qemu_group).gr_gid
        except KeyError:
            return None

    def _grant_qemu(self, vm):
        """QEMU (as libvirt's qemu user) reaches the data disk, the quote socket and the share:
        run path and run directory traversable by its group, the share's folders readable by it;
        others get nothing (.sys-config.json holds the VM's host API token)."""
        gid = self._qemu_gid()
        if gid is None:
            return
        for path, mode in ((os.path.dirname(os.path.abspath(vm.run_dir)), 0o710), (vm.run_dir, 0o710)):
            os.chown(path, -1, gid)
            os.chmod(path, mode)
        for folder, _dirs, files in os.walk(vm.shared_dir):
            os.chown(folder, -1, gid)
            os.chmod(folder, 0o755 if os.path.basename(folder) == IMAGES_DIR else 0o750)
            for name in files:
                os.chown(os.path.join(folder, name), -1, gid, follow_symlinks=False)

    def compose_images(self, vm):
        """The images the VM's compose services name (its share's app-compose.json), once each."""
        data = read_bytes(os.path.join(vm.shared_dir, "app-compose.json"), "app-compose.json")
        doc = compose.parse(data, "app-compose.json")
        if not doc.get("docker_compose_file"):
            return []
        services = compose.parse_compose_yaml(doc["docker_compose_file"], "docker_compose_file")["services"]
        names = []
        for service in services.values():
            image = service.get("image")
            if isinstance(image, str) and image and image not in names:
                names.append(image)
        return names

    def save_images(self, vm):
        """Write docker-archives of the compose's images the host's engine holds into the share's
        images/ (an archive already there of the same image ID is kept; the archives of images no
        longer wanted are removed). Each is written under a temporary name and renamed, 0644 in a
        0755 folder: QEMU reads them, the guest loads them. Returns the names saved or kept."""
        folder = os.path.join(vm.shared_dir, IMAGES_DIR)
        names = self.compose_images(vm)
        if names and not shutil.which(self.image_engine):
            log.info("VM %s: %s is not installed on this host: the guest pulls %s", vm.id, self.image_engine,
                     ", ".join(names))
            names = []
        store = image_archive.PodmanStore(self.image_engine, field="preload_images")
        wanted = {}
        for name in names:
            image_id = store.image_id(name)
            if image_id is None:
                log.info("VM %s: image %s is not in this host's %s store: the guest pulls it", vm.id, name,
                         self.image_engine)
            else:
                wanted[archive_name(name)] = (name, image_id)
        if not wanted and not os.path.isdir(folder):
            return []
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o755)
        for entry in os.listdir(folder):
            if entry not in wanted:   # an image gone from the compose or the host, or an interrupted save
                os.unlink(os.path.join(folder, entry))
        for entry, (name, image_id) in wanted.items():
            path = os.path.join(folder, entry)
            if os.path.exists(path):
                try:
                    if image_archive.read_archive(path, "preload_images").id == image_id:
                        continue
                except DstackError:
                    pass   # damaged: saved again
            tmp = os.path.join(folder, f".{uuid.uuid4().hex}.tmp")   # not *.tar: the guest loads only those
            try:
                store.save(name, tmp, "preload_images")
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            log.info("VM %s: image %s (%s) saved into its share as %s/%s", vm.id, name, image_id[:12], IMAGES_DIR,
                     entry)
        return [name for name, _id in wanted.values()]

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
        self._grant_qemu(vm)
        dom = self._domain(vm)
        xml = self.domain_xml(vm, dom)
        if dom is not None and ld.normalized_current(lv.current_xml(dom), xml) == xml:
            return dom
        return lv.define(self.conn, xml)

    def start(self, vm):
        dom = self._domain(vm) or self.create(vm)
        if self.preload_images:
            self.save_images(vm)
        self._grant_qemu(vm)   # the VMM has just rewritten the share's files
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
