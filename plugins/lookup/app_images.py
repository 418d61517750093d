# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
name: app_images
author:
  - dstack.tee contributors (@dstack-tee)
version_added: 0.1.0
short_description: The images an app folder's app.yml lists, read on the controller
description:
  - Reads the C(images) of an app folder's C(app.yml) on the controller (a lookup always runs
    there) - the docker-archive of each C(archive) entry is read with tarfile (its image ID, the
    SHA-256 of its config, and its names, manifest.json's RepoTags), and the image of each C(name)
    entry is looked up in the controller's podman store (C(podman image inspect)).
  - The role dstack.tee.app ships the result with M(dstack.tee.container_image) to the VMM host.
  - An error names the C(app.yml) entry (for example C(/path/app.yml) C(images[1].archive)) and the reason.
options:
  _terms:
    description: App folders (absolute paths).
    required: true
    type: list
    elements: path
"""

EXAMPLES = r"""
- name: Show the images examples/notes ships
  ansible.builtin.debug:
    msg: "{{ query('dstack.tee.app_images', playbook_dir ~ '/../examples/notes') }}"
"""

RETURN = r"""
_list:
  description: One item per C(app.yml) images entry, in order.
  type: list
  elements: dict
  contains:
    entry:
      description: The entry as errors name it, the C(app.yml) path and C(images[N]).
      type: str
    id:
      description: The image ID (64 hex digits).
      type: str
    names:
      description: The names the image is used under (the archive's RepoTags, or the name given).
      type: list
      elements: str
    archive:
      description: The archive on the controller; an empty string for an image given by name.
      type: str
"""

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

try:
    from ansible_collections.dstack.tee.plugins.module_utils import app_folder
    from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
except ImportError as exc:  # the collection's own module_utils: only a broken install lacks them
    raise AnsibleLookupError(f"dstack.tee.app_images: {exc}") from exc


class LookupModule(LookupBase):

    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        listed = []
        for app_dir in terms:
            try:
                listed.extend(app_folder.image_list(app_folder.read(app_dir)))
            except DstackError as exc:
                raise AnsibleLookupError(str(exc)) from None
        return listed
