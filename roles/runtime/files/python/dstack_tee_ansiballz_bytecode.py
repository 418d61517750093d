# Copyright (c) 2026 dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Keep the bytecode of Ansible's module payloads between tasks, in this Python's venv.

Ansible runs a module by handing its interpreter a zip (AnsiballZ) of the module and its
module_utils as source, and Python's zipimport compiles a source it imports from a zip every time
(it never writes bytecode there): ansible.module_utils.basic alone is ~0.2 s of CPU, every task,
on every host. Imported at start-up by a .pth line in the venvs that scripts/setup.sh and the
runtime role make, this wraps zipimport's compile step, for AnsiballZ payloads only, with a cache:
one file per path inside the payload, holding the SHA-256 of the source it was compiled from, so
a changed module or module_util is compiled again and replaces its entry. The cache is used only
when its folders are this user's own and nobody else may write to them (bytecode is code: see
_open_own_folder); any error falls back to compiling, as without it. DSTACK_TEE_ANSIBALLZ_BYTECODE=0 turns it off.
"""

import marshal
import os
import sys
import zipimport


def payload_inner_path(pathname):
    """The path inside an AnsiballZ payload, from the path zipimport compiles (.../ansible_<module>_
    payload.zip/<path inside>: the zip is in a new temporary folder every task); None for other zips."""
    zip_path, found, inner = pathname.rpartition('_payload.zip' + os.sep)
    if not found or not inner or not os.path.basename(zip_path).startswith('ansible_'):
        return None
    return inner


def cache_folder():
    """Where the entries live: $XDG_CACHE_HOME or ~/.cache, then dstack-tee/ansiballz-bytecode."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'dstack-tee', 'ansiballz-bytecode')


def _trusted(descriptor):
    info = os.fstat(descriptor)
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


def _open_own_folder(folder):
    """A descriptor of the folder (made 0700 if missing), or None: the cache folder (~/.cache), then
    dstack-tee and ansiballz-bytecode each opened from the one above it (no symlink) and each this
    user's own with no one else allowed to write to it. Bytecode is code: root whose HOME is another
    user's (sudo without -H) gets no cache there, and no folder above can be swapped in between."""
    base = os.path.dirname(os.path.dirname(folder))
    try:
        # Nothing made in a folder that is not this user's own.
        if os.stat(base if os.path.isdir(base) else os.path.dirname(base)).st_uid != os.geteuid():
            return None
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None
    descriptor = None
    try:
        for name, flags in ((base, 0), (os.path.basename(os.path.dirname(folder)), os.O_NOFOLLOW),
                            (os.path.basename(folder), os.O_NOFOLLOW)):
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY | flags, dir_fd=descriptor)
            if descriptor is not None:
                os.close(descriptor)
            descriptor = below
            if not _trusted(descriptor):
                os.close(descriptor)
                return None
        return descriptor
    except OSError:
        if descriptor is not None:
            os.close(descriptor)
        return None


def _with_filename(code, filename):
    """The code object and all it nests, naming filename (tracebacks name this task's payload)."""
    consts = tuple(_with_filename(const, filename) if isinstance(const, type(code)) else const
                   for const in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _entry(inner_path, source):
    """The entry's name for a path inside the payloads, and the header that makes it valid for this
    source: Python's bytecode magic, the optimize level, the source's SHA-256."""
    # Imported here, not at every interpreter's start.
    import hashlib  # pylint: disable=import-outside-toplevel
    from importlib.util import MAGIC_NUMBER  # pylint: disable=import-outside-toplevel
    name = hashlib.sha256(inner_path.encode('utf-8', 'surrogateescape')).hexdigest()[:40]
    return name, MAGIC_NUMBER + bytes([sys.flags.optimize]) + hashlib.sha256(source).digest()


def _read(folder, name):
    try:
        descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
    except OSError:
        return b''
    with os.fdopen(descriptor, 'rb') as cached:
        return cached.read()


def _write(folder, name, data):
    """The entry replaced at once (a temporary file renamed over it): a reader sees one or the other."""
    temporary = '%s.%d.tmp' % (name, os.getpid())
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=folder)
        with os.fdopen(descriptor, 'wb') as written:
            written.write(data)
        os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except (OSError, ValueError):
        try:
            os.unlink(temporary, dir_fd=folder)
        except OSError:
            pass


def compile_cached(compile_source, pathname, source, folder):
    """compile_source(pathname, source), through the cache in folder when pathname is in a payload."""
    inner = payload_inner_path(pathname)
    descriptor = None if inner is None else _open_own_folder(folder)
    if descriptor is None:
        return compile_source(pathname, source)
    try:
        name, header = _entry(inner, source)
        data = _read(descriptor, name)
        if data[:len(header)] == header:
            try:
                return _with_filename(marshal.loads(data[len(header):]), pathname)
            except (EOFError, ValueError, TypeError):
                pass
        code = compile_source(pathname, source)
        _write(descriptor, name, header + marshal.dumps(code))
        return code
    finally:
        os.close(descriptor)


def install():
    """Wrap zipimport's compile step (once); nothing when turned off or where zipimport differs."""
    original = getattr(zipimport, '_compile_source', None)
    if (os.environ.get('DSTACK_TEE_ANSIBALLZ_BYTECODE', '1') == '0' or original is None
            or getattr(original, 'dstack_tee_cached', False)):
        return

    def _compile_source(pathname, source):
        return compile_cached(original, pathname, source, cache_folder())

    _compile_source.dstack_tee_cached = True
    zipimport._compile_source = _compile_source  # pylint: disable=protected-access


install()
