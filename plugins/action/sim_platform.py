# Copyright (c) 2026 dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The sim_platform module's action: run in a fork of the worker on the controller (plugin_utils.module_in_process)."""

from __future__ import annotations

from ansible_collections.dstack.tee.plugins.plugin_utils.module_in_process import InProcessModuleAction as ActionModule

__all__ = ['ActionModule']
