# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Thin helpers over libvirt-python: connect, define, start, stop, undefine, state, XML.

Every libvirt failure comes out as a LibvirtFailure (a DstackError naming the operation and the
domain), and "no such domain" is None from `lookup`, not an exception. libvirt-python is
optional for importers: callers check HAS_LIBVIRT (modules report missing_required_lib).
"""

import re
import traceback

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

try:
    import libvirt
    LIBVIRT_IMPORT_ERROR = None
except ImportError:  # reported by the callers (missing_required_lib in modules)
    libvirt = None
    LIBVIRT_IMPORT_ERROR = traceback.format_exc()

HAS_LIBVIRT = libvirt is not None

# virDomainState, by name (the libvirt constants, without needing libvirt to be importable).
STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff",
          6: "crashed", 7: "pmsuspended"}
ACTIVE_STATES = ("running", "blocked", "paused", "shutdown", "pmsuspended")
# virDomainShutoffReason 1 (shutdown): the guest powered itself off; 3 (crashed), 5 (failed).
SHUTOFF_BY_GUEST = (1, 3, 5)
_NVRAM_RE = re.compile(r"<nvram[\s/>]")
_silenced = []


class LibvirtFailure(DstackError):
    """A libvirt call failed. `code` is libvirt's error code (None when libvirt is missing)."""

    def __init__(self, field, reason, code=None):
        super().__init__(field, reason)
        self.code = code


def _ignore_error(_ctx, _err):
    """libvirt prints every error to stderr unless a handler takes it; ours are raised instead."""


def _require():
    if libvirt is None:
        raise LibvirtFailure("libvirt", "the libvirt-python package is not installed")
    if not _silenced:
        libvirt.registerErrorHandler(_ignore_error, None)
        _silenced.append(True)


def _failure(operation, name, exc):
    code = exc.get_error_code() if hasattr(exc, "get_error_code") else None
    message = (exc.get_error_message() if hasattr(exc, "get_error_message") else None) or str(exc)
    where = f"{operation} {name}" if name else operation
    return LibvirtFailure(where, message, code)


def connect(uri):
    """A read-write connection to `uri` (qemu:///system, test:///default, ...)."""
    _require()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise _failure("connect", uri, exc) from None


def lookup(conn, name):
    """The domain called `name`, or None when there is none."""
    _require()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise _failure("lookup", name, exc) from None


def define(conn, xml):
    """Define (or redefine) a persistent domain from XML; returns it."""
    _require()
    try:
        return conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        failure = _failure("define", None, exc)
        if "launchSecurity" in failure.reason and "tdx" in failure.reason:
            failure = LibvirtFailure(
                "define", f"{failure.reason} (libvirt {_version(conn)} has no <launchSecurity type='tdx'>: "
                "TDX guests need a libvirt with TDX support; no_tee renders the domain without it)", failure.code)
        elif re.search(r"\bpasst\b", failure.reason):   # not host-passthrough
            failure = LibvirtFailure(
                "ports", f"{failure.reason} (libvirt {_version(conn)} has no passt backend, which forwards the ports "
                "of a VM on user networking: port forwards need libvirt 9.2 or later)", failure.code)
        raise failure from None


def _version(conn):
    """libvirt's version as text (the daemon's for a remote connection), or "?"."""
    try:
        version = conn.getLibVersion()
    except libvirt.libvirtError:
        return "?"
    return f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"


def current_xml(dom, inactive=True):
    """The domain's XML as libvirt has it: the persistent definition (inactive) or the live one."""
    _require()
    try:
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    except libvirt.libvirtError as exc:
        raise _failure("read", dom.name(), exc) from None


def state(dom):
    """(state name, reason number): ('running', 1), ('shutoff', 2), ..."""
    _require()
    try:
        code, reason = dom.state()
    except libvirt.libvirtError as exc:
        raise _failure("state", dom.name(), exc) from None
    return STATES.get(code, "nostate"), reason


def is_active(dom):
    return state(dom)[0] in ACTIVE_STATES


def start(dom):
    """Boot a defined domain (virDomainCreate); nothing when it runs already."""
    _require()
    if is_active(dom):
        return False
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        raise _failure("start", dom.name(), exc) from None
    return True


def destroy(dom):
    """Power off now (virDomainDestroy); nothing when it is not running."""
    _require()
    if not is_active(dom):
        return False
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not is_active(dom):
            return False  # it stopped on its own meanwhile
        raise _failure("destroy", dom.name(), exc) from None
    return True


def shutdown(dom):
    """Ask the guest to power off (ACPI); returns at once. Nothing when it is not running."""
    _require()
    if not is_active(dom):
        return False
    try:
        dom.shutdown()
    except libvirt.libvirtError as exc:
        raise _failure("shutdown", dom.name(), exc) from None
    return True


def undefine(dom):
    """Forget a (stopped) domain's definition, with its NVRAM file when it has one."""
    _require()
    name = dom.name()
    flags = 0
    if _NVRAM_RE.search(current_xml(dom)):
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    try:
        if flags:
            dom.undefineFlags(flags)
        else:
            dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise _failure("undefine", name, exc) from None


def remove(dom):
    """Power off if running, then undefine."""
    destroy(dom)
    undefine(dom)


def list_domains(conn):
    """Every domain of the connection, defined or transient."""
    _require()
    try:
        return conn.listAllDomains()
    except libvirt.libvirtError as exc:
        raise _failure("list domains", None, exc) from None
