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
when its folder is this user's own and nobody else may write to it (bytecode is code); any error
falls back to compiling, as without it. DSTACK_TEE_ANSIBALLZ_BYTECODE=0 turns it off.
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


def _own_folder(folder):
    """The folder, made 0700 if missing, when this user owns it and no one else can write to it."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.stat(folder)
    except OSError:
        return None
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return None
    return folder


def _with_filename(code, filename):
    """The code object and all it nests, naming filename (tracebacks name this task's payload)."""
    consts = tuple(_with_filename(const, filename) if isinstance(const, type(code)) else const
                   for const in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _entry(folder, inner_path, source):
    """The entry's file for a path inside the payloads, and the header that makes it valid for this
    source: Python's bytecode magic, the optimize level, the source's SHA-256."""
    # Imported here, not at every interpreter's start.
    import hashlib  # pylint: disable=import-outside-toplevel
    from importlib.util import MAGIC_NUMBER  # pylint: disable=import-outside-toplevel
    name = hashlib.sha256(inner_path.encode('utf-8', 'surrogateescape')).hexdigest()[:40]
    return os.path.join(folder, name), MAGIC_NUMBER + bytes([sys.flags.optimize]) + hashlib.sha256(source).digest()


def compile_cached(compile_source, pathname, source, folder):
    """compile_source(pathname, source), through the cache in folder when pathname is in a payload."""
    inner = payload_inner_path(pathname)
    if inner is None or _own_folder(folder) is None:
        return compile_source(pathname, source)
    entry, header = _entry(folder, inner, source)
    try:
        with open(entry, 'rb') as cached:
            data = cached.read()
    except OSError:
        data = b''
    if data[:len(header)] == header:
        try:
            return _with_filename(marshal.loads(data[len(header):]), pathname)
        except (EOFError, ValueError, TypeError):
            pass
    code = compile_source(pathname, source)
    temporary = '%s.%d.tmp' % (entry, os.getpid())
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, 'wb') as written:
            written.write(header + marshal.dumps(code))
        os.replace(temporary, entry)
    except (OSError, ValueError):
        try:
            os.unlink(temporary)
        except OSError:
            pass
    return code


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
