"""Shared test helpers: run the collection's modules for real, as Ansible runs them."""

import json
import os
import signal
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "contracts"))  # devchain.py: the ganache development chain

# Property tests. "ci" (the default) is derandomized: each test's seed is a hash of its source, so
# every machine and every run tries the same examples, and a red `make test` is a real regression,
# not a new find. HYPOTHESIS_PROFILE=long searches deeper, from a random seed per run that the
# header prints (rerun a failure with --hypothesis-seed=N). Failures print a @reproduce_failure blob.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before Hypothesis's own hook reads the option: a random search still has one seed per run.
    if not settings.default.derandomize and config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(random.SystemRandom().getrandbits(64))


def pytest_sessionfinish(session, exitstatus):
    """With DSTACK_TESTS_NO_SKIPS=1 (make test sets it) a skipped test fails the run: everything
    the tests need is installed by scripts/setup.sh --test, so a skip here hides a broken set-up."""
    if os.environ.get("DSTACK_TESTS_NO_SKIPS") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            print(f"\nskipped, which make test does not allow: {report.nodeid}: {reason}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The test files that take minutes (whole deployments, fleets, venvs), longest first, measured in a
# whole run (--durations). make test spreads files over two workers (xdist --dist loadfile
# --no-loadscope-reorder): started first, they leave the short files to even out the end, where
# xdist's own order (most tests first) started them last and left one worker alone with them for
# minutes. The other files keep their order.
SLOW_FILES = (
    "tests/integration/test_fleet_deploy.py",
    "tests/integration/test_fleet_runtime.py",
    "tests/integration/test_demo_playbook.py",
    "tests/integration/test_app_absent.py",
    "tests/integration/test_runtime_role.py",
    "tests/integration/test_deploy_app_contract.py",
    "tests/security/test_ansible_secrets.py",
    "tests/security/test_cvm_drift.py",
    "tests/integration/test_vmm.py",
    "tests/integration/test_gateway_declared_domain.py",
    "tests/integration/test_readme_tdx.py",
    "tests/integration/test_newcomer_mistakes.py",
)


def pytest_collection_modifyitems(config, items):
    """Under xdist, SLOW_FILES first (see above); a plain pytest run keeps the collection order."""
    if not hasattr(config, "workerinput"):
        return
    rank = {path: index for index, path in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(SLOW_FILES)))


def pytest_report_header(config):
    profile = settings.get_current_profile_name()
    if settings.default.derandomize:
        return (f"hypothesis profile {profile}: derandomized (each property test's seed is a hash "
                f"of its source), max_examples={settings.default.max_examples}")
    return (f"hypothesis profile {profile}: seed {config.getoption('hypothesis_seed')} "
            f"(rerun with --hypothesis-seed=N), max_examples={settings.default.max_examples}")


IMAGE = "localhost/dstack-test-busybox:latest"
CHAIN_ID = 1337
KEY = "0x" + "42" * 32        # funded owner key on the test chain
OTHER_KEY = "0x" + "43" * 32  # funded, owns nothing


def stop_process_group(proc, timeout=20):
    """SIGTERM a server started with start_new_session (its whole group), SIGKILL after `timeout` s."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def eventually(call, timeout=10.0, errors=(OSError,), interval=0.2):
    """call()'s result once it stops raising one of `errors`; the last error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except errors:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def short_tmp():
    """A short folder: CVM sockets live in the run path, and unix socket paths stop at 107 bytes."""
    import tempfile  # pylint: disable=import-outside-toplevel
    folder = Path(tempfile.mkdtemp(prefix="dvt-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _has_podman_compose():
    from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import podman_compose_argv  # pylint: disable=import-outside-toplevel
    return bool(podman_compose_argv())


# podman-compose is the venv's (pyproject.toml), as the guest's runner finds it.
needs_podman = pytest.mark.skipif(not (shutil.which("podman") and _has_podman_compose() and os.path.exists("/bin/busybox")),
                                  reason="podman, podman-compose and busybox-static are installed by scripts/setup.sh")


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory):
    """A local image from busybox-static (no registry here)."""
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "httpd", "env", "mkdir", "cat"):
        os.symlink("busybox", root / "bin" / applet)
    tar = tmp_path_factory.mktemp("img") / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    env = dict(os.environ, CONTAINERS_CONF=str(_containers_conf(tmp_path_factory.mktemp("conf"))))
    subprocess.run(["podman", "import", "-q", str(tar), IMAGE], check=True, capture_output=True, env=env)
    return IMAGE


def _containers_conf(folder):
    from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import CONTAINERS_CONF  # pylint: disable=import-outside-toplevel
    path = folder / "containers.conf"
    path.write_text(CONTAINERS_CONF)
    return path


# pip's own compiling of every installed module to .pyc is two thirds of a runtime venv's install
# (37 s of 48 here); the tests' agents compile only what they import, as they import it.
NO_COMPILE = "--no-compile"


@pytest.fixture(scope="session")
def runtime_wheels(tmp_path_factory):
    """pyproject.toml's dependencies as wheels in a folder, for dstack.tee.runtime on a host without
    PyPI (--no-index --find-links); pip's cache makes this quick."""
    import tomllib  # pylint: disable=import-outside-toplevel
    folder = tmp_path_factory.mktemp("wheels")
    with open(ROOT / "pyproject.toml", "rb") as src:
        dependencies = tomllib.load(src)["project"]["dependencies"]
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(folder), *dependencies],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


class ModuleResult(dict):
    """A module's JSON result, plus the raw output text (to check that no secret appears)."""
    raw = ""


def run_module(name, args, check=False, diff=False, timeout=300):
    """Run plugins/modules/<name>.py the way Ansible does: a JSON args file, JSON on stdout.
    timeout: a CVM's boot waited for by dstack.tee.cvm can take minutes on a loaded machine."""
    payload = dict(args, _ansible_check_mode=check, _ansible_diff=diff, _ansible_no_log=False)
    proc = subprocess.run(
        [sys.executable, "-m", f"ansible_collections.dstack.tee.plugins.modules.{name}"],
        input=json.dumps({"ANSIBLE_MODULE_ARGS": payload}), capture_output=True, text=True,
        timeout=timeout, check=False)
    try:
        result = ModuleResult(json.loads(proc.stdout))
    except ValueError:
        raise AssertionError(f"module {name} printed no JSON:\n{proc.stdout}\n{proc.stderr}") from None
    result.raw = proc.stdout + proc.stderr
    # ansible-core 2.19 returns warnings as structured events; tests read their text.
    result["warnings"] = [w["event"]["msg"] if isinstance(w, dict) else w for w in result.get("warnings", [])]
    return result


def run_playbook(playbook, *extra, env=None, timeout=600):
    """ansible-playbook from the venv with the project's ansible.cfg; returns the CompletedProcess
    (subprocess.TimeoutExpired after `timeout` seconds)."""
    full_env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                    ANSIBLE_FORCE_COLOR="0", PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    full_env.update(env or {})
    return subprocess.run([str(VENV_BIN / "ansible-playbook"), str(playbook), *extra],
                          capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout,
                          check=False)


@pytest.fixture
def module():
    return run_module


@pytest.fixture
def kms_state(tmp_path):
    """A KMS state directory with fresh root keys."""
    from ansible_collections.dstack.tee.plugins.module_utils import root_keys
    keys, _created = root_keys.load_or_create(str(tmp_path / "kms"))
    return keys


def ganache_chain():
    """Yield (rpc_url, web3) of a ganache chain on a free loopback port, KEY and OTHER_KEY funded.

    For module-scoped fixtures (`yield from ganache_chain()`): the modules and the KMS run in other
    processes, so the chain must be a real JSON-RPC server. Skips when node or ganache is missing.
    """
    pytest.importorskip("web3", reason="web3 is installed by scripts/setup.sh --test")
    from devchain import DevChain, DevChainUnavailable  # pylint: disable=import-outside-toplevel
    chain = DevChain(CHAIN_ID)
    try:
        chain.start()
    except DevChainUnavailable as exc:
        pytest.skip(str(exc))
    try:
        for key in (KEY, OTHER_KEY):
            chain.fund(chain.w3.eth.account.from_key(key).address)
        yield chain.url, chain.w3
    finally:
        chain.stop()
