# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Container images moved as files, where no registry is reachable: the one reading of an image
archive (a docker-archive, what `podman save --format docker-archive` writes) and the podman store
calls that save, load and look up images.

An image's ID is the SHA-256 of its config (podman's `.Id`); a docker-archive carries that config
as a file its manifest.json names, so the ID an archive will load as is known before it is loaded,
on any machine, with tarfile alone. roles/app compares it with the VMM host's store (the
lookup dstack.tee.app_images on the controller, dstack.tee.container_image on the host).
"""

import hashlib
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass

from ansible_collections.dstack.tee.plugins.module_utils import json_limits
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, last_line

MANIFEST = "manifest.json"
# manifest.json and an image config are small; an archive's are bounded before they are parsed.
MAX_JSON_BYTES = 4 * 1024 * 1024
ID_RE = re.compile(r"\A(?:sha256:)?([0-9a-f]{64})\Z")
# podman calls that write a whole image (save, load) may take a while on a big one.
PODMAN_TIMEOUT = 900
LOOKUP_TIMEOUT = 60
HOW_TO_SAVE = "podman save --format docker-archive -o FILE NAME writes one"


@dataclass(frozen=True)
class ArchiveImage:
    """The image a docker-archive holds: its ID (64 hex digits, the SHA-256 of its config) and
    the names it is loaded under (manifest.json's RepoTags)."""
    path: str
    id: str
    names: tuple


def image_id(value, field):
    """An image ID as podman prints it (64 lowercase hex digits) from that or `sha256:<hex>`."""
    match = ID_RE.match(value.strip().lower()) if isinstance(value, str) else None
    if not match:
        raise DstackError(field, "must be an image ID: 64 hex digits, optionally prefixed by sha256:")
    return match.group(1)


def check_name(value, field):
    """An image name (`localhost/notes:1`, `busybox`, `name@sha256:...`): a non-empty string
    without spaces or control characters."""
    if not isinstance(value, str) or not value or len(value) > 512 or \
            any(c.isspace() or not c.isprintable() for c in value):
        raise DstackError(field, "must be an image name such as localhost/NAME:TAG (no spaces)")
    return value


def _member_path(name):
    """A member's name as manifest.json refers to it ("./x" and "x" are one file)."""
    return os.path.normpath("/" + name).lstrip("/")


def _read_member(tar, members, name, field, what):
    member = members.get(_member_path(name))
    if member is None or not member.isfile():
        raise DstackError(field, f"{tar.name} has no {what} {name!r}: not a docker-archive ({HOW_TO_SAVE})")
    if member.size > MAX_JSON_BYTES:
        raise DstackError(field, f"{tar.name}: its {what} {name!r} is {member.size} bytes, over {MAX_JSON_BYTES}")
    return tar.extractfile(member).read()


def read_archive(path, field):
    """The image of the docker-archive at `path`, checked without extracting anything: a tar (plain
    or compressed) whose manifest.json lists exactly one image, with its config, its layers and at
    least one name. Raises DstackError naming `field` and the file."""
    try:
        tar = tarfile.open(path, "r:*")  # pylint: disable=consider-using-with
    except FileNotFoundError:
        raise DstackError(field, f"{path} does not exist ({HOW_TO_SAVE})") from None
    except IsADirectoryError:
        raise DstackError(field, f"{path} is a folder, not an image archive ({HOW_TO_SAVE})") from None
    except OSError as exc:
        raise DstackError(field, f"cannot read {path}: {exc.strerror}") from None
    except tarfile.TarError:
        raise DstackError(field, f"{path} is not a tar archive ({HOW_TO_SAVE})") from None
    with tar:
        try:
            members = {_member_path(m.name): m for m in tar.getmembers()}
            manifest = json_limits.loads(_read_member(tar, members, MANIFEST, field, "file"),
                                         f"{field}: {path}: {MANIFEST}")
            if not isinstance(manifest, list) or len(manifest) != 1 or not isinstance(manifest[0], dict):
                count = len(manifest) if isinstance(manifest, list) else "no list of"
                raise DstackError(field, f"{path} holds {count} images: an archive must hold one image "
                                         f"(save each image on its own, {HOW_TO_SAVE})")
            entry = manifest[0]
            config_name, names, layers = entry.get("Config"), entry.get("RepoTags"), entry.get("Layers")
            if not isinstance(config_name, str) or not isinstance(layers, list) or \
                    not all(isinstance(layer, str) for layer in layers):
                raise DstackError(field, f"{path}: its {MANIFEST} has no Config file name and Layers list")
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
                raise DstackError(field, f"{path} holds an image without a name (RepoTags): the compose file "
                                         f"names its images, so save it by name ({HOW_TO_SAVE})")
            digest = hashlib.sha256(_read_member(tar, members, config_name, field, "image config")).hexdigest()
            for layer in layers:
                if _member_path(layer) not in members:
                    raise DstackError(field, f"{path} lacks the layer {layer!r} its {MANIFEST} lists")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DstackError(field, f"{path} is not a whole tar archive ({exc})") from None
    # podman names the config file after its digest: a name that says otherwise is a damaged archive.
    stem = os.path.basename(config_name).removesuffix(".json")
    if ID_RE.match(stem) and ID_RE.match(stem).group(1) != digest:
        raise DstackError(field, f"{path}: its image config {config_name!r} hashes to sha256:{digest}, not to "
                                 "its name: the archive is damaged")
    return ArchiveImage(path=path, id=digest, names=tuple(check_name(n, f"{field}: {path}: RepoTags") for n in names))


class PodmanStore:
    """The podman image store of the user this runs as, the one a container started by the same
    user with the same storage settings sees. Every failure is a DstackError naming `field`."""

    def __init__(self, podman="podman", field="podman"):
        self.podman = podman
        self.field = field

    def _run(self, args, timeout):
        try:
            return subprocess.run([self.podman, *args], capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except FileNotFoundError:
            raise DstackError(self.field, f"{self.podman} is not installed on this host") from None
        except subprocess.TimeoutExpired:
            raise DstackError(self.field, f"`{self.podman} {args[0]}` did not finish in {timeout} s") from None

    def image_id(self, ref):
        """The ID of the image `ref` (a name or an ID) names in this store; None when it has none."""
        proc = self._run(["image", "inspect", "--format", "{{.Id}}", "--", ref], LOOKUP_TIMEOUT)
        if proc.returncode != 0:
            if "image not known" in proc.stderr or "no such image" in proc.stderr.lower():
                return None
            raise DstackError(self.field, f"podman image inspect {ref} failed: {last_line(proc.stderr)}")
        return image_id(proc.stdout, self.field)

    def holds(self, expected_id, names):
        """Whether the store has the image `expected_id` under every one of `names` (a name that
        points at another image, an older build, counts as lacking)."""
        if not names:
            return self.image_id(expected_id) == expected_id
        return all(self.image_id(name) == expected_id for name in names)

    def load(self, archive, field):
        proc = self._run(["load", "--quiet", "--input", archive], PODMAN_TIMEOUT)
        if proc.returncode != 0:
            raise DstackError(field, f"podman load of {archive} failed: {last_line(proc.stderr)}")

    def save(self, name, archive, field):
        """`podman save --format docker-archive` of the image `name` to `archive` (which must not exist)."""
        proc = self._run(["save", "--quiet", "--format", "docker-archive", "--output", archive, "--", name],
                         PODMAN_TIMEOUT)
        if proc.returncode != 0:
            raise DstackError(field, f"podman save of {name} failed: {last_line(proc.stderr)}")
