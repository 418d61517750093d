"""wireguard.preload_pyroute2: pyroute2 is imported in a thread of its own (the guest's boot starts
it before its gateway step), and a caller that needs it meanwhile gets all of its names, never a
half-done import."""

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys, threading
    from ansible_collections.dstack.tee.plugins.module_utils import wireguard as wg
    assert "pyroute2" not in sys.modules, "wireguard imports pyroute2 at import time"
    wg.preload_pyroute2()
    preload = [t for t in threading.enumerate() if t.name == "preload-pyroute2"]
    assert preload, [t.name for t in threading.enumerate()]
    wg._require_pyroute2()   # at once, while the thread imports
    assert None not in (wg.IPRoute, wg.NetNS, wg.pyroute2_netns, wg.NetlinkError)
    preload[0].join()
    wg.preload_pyroute2()    # done: no second thread
    assert "preload-pyroute2" not in [t.name for t in threading.enumerate()]
    print("ok")
""")


def test_preload_imports_pyroute2_beside_and_a_caller_meanwhile_gets_every_name():
    for _attempt in range(3):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
