"""A boot step that fails with an unexpected exception (a bug, or a library in the image too old for
the agent: bookworm's cryptography 38 has no Certificate.not_valid_after_utc, which the gateway step
raised as AttributeError in a VM) fails the boot like any other step: BootFailed naming the step,
the host told, the containers started beside the gateway step taken down. Before, the exception
went through Boot.run untouched: the host was told nothing, the containers stayed up, and the VM's
agent hung instead of exiting (so dstack-init never powered the VM off)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from test_guest_boot import HostApi, NoContainers, _boot_without_containers, _tell_host, world  # noqa: E402,F401  pylint: disable=unused-import
from ansible_collections.dstack.tee.agents.guest.boot import BootFailed  # noqa: E402


def test_an_unexpected_exception_in_a_step_fails_the_boot_and_tells_the_host(tmp_path, module, world):  # noqa: F811  pylint: disable=redefined-outer-name
    class BrokenRunner(NoContainers):
        def up(self, *args):
            super().up(*args)
            raise AttributeError("'Certificate' object has no attribute 'not_valid_after_utc'")

    host = HostApi()
    try:
        boot, _runner, _ctx = _boot_without_containers(tmp_path, module, world, _tell_host(host.url))
        boot.runner = BrokenRunner()
        with pytest.raises(BootFailed) as err:
            boot.run()
        assert err.value.field == "containers" and err.value.reason.startswith("unexpected AttributeError"), str(err.value)
        assert boot.runner.started and boot.runner.downs == 1   # what was started is taken down
        assert host.events[-1] == ("boot.error", "containers: unexpected AttributeError (the agent's log has its traceback)")
    finally:
        host.close()
