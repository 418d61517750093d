#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: container_image
short_description: Ship container images as archives to a podman store that lacks them, checked by image ID
version_added: 0.1.0
description:
  - Moves container images where no registry is reachable - the role dstack.tee.app (C(deploy-app.yml))
    runs it for the images an app's C(app.yml) lists, on the VMM host and on the controller.
  - An image is known by its ID (the SHA-256 of its config, podman's C(.Id)) and the names it is
    used under. A store holds it when every one of O(images[].names) is the image O(images[].id)
    there; a name that is another image there (an older build) counts as lacking.
  - O(state=query) reports, for each image, whether this host's store holds it (RV(missing) lists
    those it lacks). Reads only.
  - O(state=present) loads each image the store lacks from its docker-archive (C(podman load)),
    after checking that the archive holds that image ID, and checks afterwards that every name is
    that image. A mismatch fails naming the archive, before anything is loaded when it can.
  - O(state=archived) writes each image of this host's store to a docker-archive
    (C(podman save --format docker-archive)) and checks that the archive holds the image ID
    expected; the controller side of shipping an image given by name.
  - The store is that of the user the module runs as, with podman's default storage settings -
    for root C(/var/lib/containers/storage), the one the CVMs of the VMM's C(process) backend run
    their containers from (the guest agent's compose runner sets only C(HOME) and
    C(CONTAINERS_CONF), which do not move root's store).
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
    details: A second run finds the images in the store (or the archives written) and changes nothing.
options:
  images:
    description: The images, each known by its ID and names.
    type: list
    elements: dict
    required: true
    suboptions:
      id:
        description: The image ID (64 hex digits, optionally prefixed by C(sha256:)).
        type: str
        required: true
      names:
        description:
          - The names the image must have in the store (the names the compose file uses).
          - O(state=archived) saves the image under its first name.
        type: list
        elements: str
        default: []
      archive:
        description:
          - The image's docker-archive on this host - loaded from with O(state=present), written
            with O(state=archived). Not read with O(state=query) (returned as given).
          - Unused when O(archive_dir) is given.
        type: path
      entry:
        description: What messages call the image (the role dstack.tee.app gives the C(app.yml) entry); the ID when unset.
        type: str
  archive_dir:
    description:
      - A folder holding each image's archive as C(<id>.tar), instead of O(images[].archive); the
        archives are read from it (O(state=present)) or written to it (O(state=archived)).
    type: path
  state:
    description: Report what the store lacks, load what it lacks, or write archives.
    type: str
    choices: [query, present, archived]
    default: present
  podman:
    description: The podman command.
    type: str
    default: podman
extends_documentation_fragment:
  - dstack.tee.attributes
seealso:
  - module: dstack.tee.cvm
"""

EXAMPLES = r"""
- name: Look for the images in the VMM host's store
  dstack.tee.container_image:
    state: query
    images:
      - id: sha256:0a86657f80ccf1ca0e7b3164f355007dea7ab717ddc0cf00baeab949793ada70
        names: [localhost/dstack-notes-store:latest]
  delegate_to: vmm1
  register: found

- name: Copy the archives the host lacks
  ansible.builtin.copy:
    src: "examples/notes/image/notes-store.tar"
    dest: "/var/tmp/images/{{ item.id }}.tar"
    mode: "0600"
  loop: "{{ found.missing }}"
  delegate_to: vmm1

- name: Load them (podman load), each checked by its image ID
  dstack.tee.container_image:
    images: "{{ found.missing }}"
    archive_dir: /var/tmp/images
  delegate_to: vmm1
"""

RETURN = r"""
images:
  description: Each image as given, with C(id) normalised, C(present) (whether the store held it before this run) and C(changed).
  returned: always
  type: list
  elements: dict
  sample: [{"entry": "app.yml: images[0]", "id": "0a86...da70", "names": ["localhost/x:1"], "archive": "", "present": false, "changed": true}]
missing:
  description: The images (as given, C(id) normalised) the store lacked before this run.
  returned: always
  type: list
  elements: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import image_archive
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def _wanted(images):
    wanted = []
    for pos, image in enumerate(images):
        entry = image.get("entry") or f"images[{pos}]"
        wanted.append({"entry": entry, "id": image_archive.image_id(image["id"], f"{entry}: id"),
                       "names": [image_archive.check_name(n, f"{entry}: names") for n in image.get("names") or []],
                       "archive": image.get("archive") or ""})
    return wanted


def _archive(image, archive_dir):
    path = os.path.join(archive_dir, image["id"] + ".tar") if archive_dir else image["archive"]
    if not path:
        raise DstackError(f"{image['entry']}: archive", "is required (or archive_dir) to load or save the image")
    return path


def _load(store, image, path):
    """Load the archive at path into the store: its image ID checked before, its names after."""
    field = image["entry"]
    found = image_archive.read_archive(path, field)
    if found.id != image["id"]:
        raise DstackError(field, f"the archive {path} holds the image sha256:{found.id}, not the expected "
                                 f"sha256:{image['id']}: nothing was loaded")
    store.load(path, field)
    for name in image["names"] or [image["id"]]:
        loaded = store.image_id(name)
        if loaded != image["id"]:
            raise DstackError(field, f"after podman load of the archive {path}, {name} is the image "
                                     f"{'sha256:' + loaded if loaded else '(none)'}, not the expected "
                                     f"sha256:{image['id']}")


def _save(store, image, path):
    """Write the store's image to a new docker-archive at path, checked to hold that image ID."""
    field = image["entry"]
    if not image["names"]:
        raise DstackError(f"{field}: names", "must name the image to save")
    if os.path.exists(path):
        os.unlink(path)  # podman save refuses to replace a file; an old archive is written anew
    store.save(image["names"][0], path, field)
    found = image_archive.read_archive(path, field)
    if found.id != image["id"]:
        os.unlink(path)
        raise DstackError(field, f"podman save of {image['names'][0]} wrote the image sha256:{found.id}, not the "
                                 f"expected sha256:{image['id']} (was it rebuilt meanwhile?)")


def _archived(image, path):
    """Whether path already holds the image (a second run writes nothing)."""
    if not os.path.isfile(path):
        return False
    try:
        found = image_archive.read_archive(path, image["entry"])
    except DstackError:
        return False
    return found.id == image["id"] and set(image["names"][:1]) <= set(found.names)


def _line(image, state):
    return f"{image['entry']}: {', '.join(image['names']) or 'sha256:' + image['id']}: {state}\n"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            images=dict(type="list", elements="dict", required=True, options=dict(
                id=dict(type="str", required=True),
                names=dict(type="list", elements="str", default=[]),
                archive=dict(type="path"),
                entry=dict(type="str"),
            )),
            archive_dir=dict(type="path"),
            state=dict(type="str", choices=["query", "present", "archived"], default="present"),
            podman=dict(type="str", default="podman"),
        ),
        supports_check_mode=True,
    )
    state, archive_dir = module.params["state"], module.params["archive_dir"]
    store = image_archive.PodmanStore(module.params["podman"])
    results, before, after = [], "", ""
    try:
        wanted = _wanted(module.params["images"])
        for image in wanted:
            if state == "archived":
                path = _archive(image, archive_dir)
                present = _archived(image, path)
                if not present and not module.check_mode:
                    _save(store, image, path)
                results.append(dict(image, archive=path, present=present, changed=not present))
                before += _line(image, f"in {path}" if present else f"(no archive at {path})")
                after += _line(image, f"in {path}")
                continue
            present = store.holds(image["id"], image["names"])
            changed = state == "present" and not present
            if changed and not module.check_mode:
                _load(store, image, _archive(image, archive_dir))
            results.append(dict(image, present=present, changed=changed))
            before += _line(image, "sha256:" + image["id"] if present else "(not in the store)")
            after += _line(image, "sha256:" + image["id"] if present or state == "present" else "(not in the store)")
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field, images=results)
    changed = any(r["changed"] for r in results)
    module.exit_json(changed=changed, images=results,
                     missing=[{k: r[k] for k in ("entry", "id", "names", "archive")} for r in results if not r["present"]],
                     diff={"before": before, "after": after} if changed else {})


if __name__ == "__main__":
    main()
