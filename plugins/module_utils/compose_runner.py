# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Runs the app's docker-compose services: docker compose where a Docker engine answers, else podman.

The app's compose file is rewritten once, into the work folder, so that:
- every service gets the CVM's guest-agent sockets mounted at /var/run/dstack.sock and
  /var/run/tappd.sock (where the app declares them, their source is replaced by this CVM's socket);
- published ports follow the VM's port map (`port_map`: CVM port -> "host_address:host_port"),
  when one is given (the process backend, where CVMs share the host's network).
With podman the runner is the venv's podman-compose (pyproject.toml pins 1.6+, whose `up -d`
creates and starts the containers in depends_on order with no fixed sleep; Debian's 1.0 slept
1 s after each container), without a pod (`--in-pod false`: plain containers on the project's
network, as before). A boot's fresh project (prepare() made its network and found none of its
containers) with a plain compose is started without it: one `podman run -d` per container, with
podman-compose's own arguments (compose_direct: 0.4-0.5 s less for one service). `down` also
removes the project's networks, which podman-compose leaves: every leftover network is read by
every later podman call (about 12 ms each, per call).
With a network namespace (`netns`, the CVM's own: podman only), the engine runs inside it
(`nsenter --net=/run/netns/NAME podman-compose ...`; not `ip netns exec`, whose private /sys has
no cgroup mounts for runc): the project's bridge network is made in the CVM's namespace and a
published port is the CVM's port on the CVM's addresses (its WireGuard address among them), as
in a VM; the port map does not apply. Its network definitions are the CVM's own too, as in a VM:
podman reads them from the work folder (`--network-config-dir`), so that a boot does not pay for
the networks of the host's other CVMs, and two CVMs may use the same subnet in their namespaces.
(`network_mode: ns:/run/netns/NAME` cannot be used: podman-compose adds the project network after
it, which podman refuses.)
The runner is given only the app's allowed env values (plus PATH and the container settings),
so the compose file can interpolate nothing else; its output, which echoes `-e KEY=value`, is
never logged, and only scrubbed of every value in an error.
Engine "none": the compose file is measured and written but nothing is started; the CVM's
workload is a process its host runs beside the agent (the gateway's own CVM on the simulated
default: the measured compose names the gateway, `dstack-gateway serve` runs under supervisord).
"""

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys

from ansible_collections.dstack.tee.plugins.module_utils.app_compose import parse_compose_yaml
from ansible_collections.dstack.tee.plugins.module_utils.compose_direct import podman_run_plan
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, last_line
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write
from ansible_collections.dstack.tee.plugins.module_utils import system_path
from ansible_collections.dstack.tee.plugins.module_utils.wireguard import check_netns_name

try:
    import yaml
except ImportError:  # PyYAML comes with ansible-core; parse_compose_yaml names it when missing
    yaml = None

GUEST_SOCKETS = {"/var/run/dstack.sock": "dstack", "/run/dstack.sock": "dstack",
                 "/var/run/dstack/dstack.sock": "dstack", "/var/run/tappd.sock": "tappd", "/run/tappd.sock": "tappd"}
NETNS_DIR = "/run/netns"
PODMAN_PROJECT_LABEL = "io.podman.compose.project"
MOUNT_POINTS = {"dstack": "/var/run/dstack.sock", "tappd": "/var/run/tappd.sock"}
# podman on these machines (machine-recipes.md): runc (crun fails with hybrid cgroups) and
# explicit rlimits (the defaults need CAP_SYS_RESOURCE).
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""


def podman_compose_argv():
    """How to run podman-compose: the one installed with this interpreter (the venv's, the version
    pyproject.toml pins), else one on PATH; [] when there is none."""
    if importlib.util.find_spec("podman_compose") is not None:
        return [sys.executable, "-m", "podman_compose"]
    found = shutil.which("podman-compose")
    return [found] if found else []


def _split_volume(entry):
    if isinstance(entry, dict):
        return entry.get("source"), entry.get("target"), entry
    parts = str(entry).split(":")
    return parts[0], parts[1] if len(parts) > 1 else None, entry


def rewrite_compose(compose_text, sockets, port_map=None):
    """The app's compose, with this CVM's sockets mounted and ports mapped; the parsed document
    (ComposeRunner.up writes it as YAML and may start it itself, compose_direct)."""
    doc = parse_compose_yaml(compose_text, "docker_compose_file")
    for name, service in doc["services"].items():
        volumes = []
        mounted = set()
        for entry in service.get("volumes") or []:
            source, target, original = _split_volume(entry)
            kind = GUEST_SOCKETS.get(source or "")
            if kind and sockets.get(kind):
                mounted.add(target)
                if isinstance(original, dict):
                    volumes.append(dict(original, source=sockets[kind]))
                else:
                    rest = str(original).split(":")[1:]
                    volumes.append(":".join([sockets[kind], *rest]))
            else:
                volumes.append(original)
        for kind, target in MOUNT_POINTS.items():
            if sockets.get(kind) and target not in mounted:
                volumes.append(f"{sockets[kind]}:{target}")
        service["volumes"] = volumes
        if port_map is not None and service.get("ports"):
            service["ports"] = [_map_port(p, port_map, name) for p in service["ports"]]
    return doc


def _map_port(entry, port_map, service):
    """'8080:80' publishes CVM port 8080; on a shared host it becomes port_map[8080]:80."""
    text = str(entry.get("published", "")) + ":" + str(entry.get("target")) if isinstance(entry, dict) else str(entry)
    proto = ""
    if "/" in text:
        text, proto = text.rsplit("/", 1)
        proto = "/" + proto
    parts = text.split(":")
    if len(parts) < 2:
        raise DstackError("ports", f"service {service!r} publishes {entry!r} without a CVM port; use CVM:CONTAINER")
    cvm_port, container_port = parts[-2], parts[-1]
    host = port_map.get(int(cvm_port)) if cvm_port.isdigit() else None
    if host is None:
        raise DstackError("ports", f"service {service!r} publishes CVM port {cvm_port}, which the VM's port map "
                                   "does not forward")
    return f"{host}:{container_port}{proto}"


LOG_TAIL_DEFAULT, LOG_TAIL_MAX = 200, 10000
LOG_MAX_BYTES = 4 * 1024 * 1024


class ComposeRunner:
    """docker compose or podman-compose, for one CVM's project."""

    def __init__(self, project, work_dir, engine="auto", netns=None):
        self.project = project
        self.work_dir = work_dir
        self.netns = netns
        self.engine = self._pick("podman" if netns and engine == "auto" else engine)
        if netns and self.engine != "none":
            if self.engine != "podman":
                raise DstackError("netns", "containers join the CVM's network namespace with podman only")
            check_netns_name(netns)
        self.compose_file = os.path.join(work_dir, "docker-compose.yaml")
        # With its own namespace, the CVM's own network definitions (see the module's note).
        self.network_dir = os.path.join(work_dir, "podman-networks") if netns and self.engine == "podman" else None
        self._network_maker = None  # prepare()'s `podman network create`
        self._existing = None  # prepare()'s `podman ps` of the project's containers

    @staticmethod
    def _pick(engine):
        if engine != "auto":
            return engine
        if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=20,
                                                     check=False).returncode == 0:
            return "docker"
        if shutil.which("podman") and podman_compose_argv():
            return "podman"
        raise DstackError("runner", "no container engine: need docker (with an engine) or podman with podman-compose")

    def _env(self, app_env):
        env = {"PATH": system_path.with_sbin(), "HOME": self.work_dir}  # podman's plugins need iptables
        if self.engine == "podman":
            conf = os.environ.get("CONTAINERS_CONF") or os.path.join(self.work_dir, "containers.conf")
            if not os.path.exists(conf):
                atomic_write(conf, CONTAINERS_CONF.encode(), mode=0o644)
            env["CONTAINERS_CONF"] = conf
        env.update(app_env)
        return env

    def _podman_options(self):
        """podman's global options for this CVM: its own network definitions, with a namespace."""
        if not self.network_dir:
            return []
        os.makedirs(self.network_dir, mode=0o700, exist_ok=True)
        return ["--network-config-dir", self.network_dir]

    def _podman(self, *args):
        return ["podman", *self._podman_options(), *args]

    def _engine(self, *args):
        return self._podman(*args) if self.engine == "podman" else ["docker", *args]

    def _in_netns(self, argv):
        return ["nsenter", f"--net={NETNS_DIR}/{self.netns}", *argv] if self.netns else argv

    def _command(self, *args):
        if self.engine == "docker":
            return ["docker", "compose", "-p", self.project, "-f", self.compose_file, *args]
        compose = podman_compose_argv()
        if not compose:
            raise DstackError("runner", "podman-compose is not installed (scripts/setup.sh installs it into the venv)")
        argv = [*compose, "--in-pod", "false", "-p", self.project, "-f", self.compose_file]
        if self._podman_options():
            argv.append("--podman-args=" + shlex.join(self._podman_options()))
        return self._in_netns([*argv, *args])

    def prepare(self, compose_text):
        """Start making the project's default network, in the background, while the boot goes on:
        `up` then finds it (podman-compose's `network create` and second `network exists`, about
        0.1 s, off the containers step). Only with podman, and only for a compose that declares no
        network of its own: the network compose names <project>_default, labelled as podman-compose
        labels it (so that down removes it)."""
        if self.engine != "podman" or self._network_maker is not None:
            return
        try:
            services = parse_compose_yaml(compose_text, "docker_compose_file")
        except DstackError:
            return  # up reports it
        if services.get("networks") or any(isinstance(service, dict) and {"networks", "network_mode"} & set(service)
                                           for service in services["services"].values()):
            return
        labels = [f"--label={label}={self.project}" for label in (PODMAN_PROJECT_LABEL, "com.docker.compose.project")]
        self._network_maker = subprocess.Popen(  # pylint: disable=consider-using-with
            self._in_netns(self._podman("network", "create", *labels, f"{self.project}_default")),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self._env({}))
        # Whether the project has containers already (a CVM booted again): then podman-compose decides
        # what to keep, else up() may start the containers itself (compose_direct).
        self._existing = subprocess.Popen(  # pylint: disable=consider-using-with
            self._podman("ps", "-aq", "--filter", f"label={PODMAN_PROJECT_LABEL}={self.project}"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self._env({}))

    @staticmethod
    def _finish(proc):
        """A prepare() command's exit code and output (killed after 60 s: -9)."""
        try:
            out, _err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return -9, b""
        return proc.returncode, out or b""

    def _prepared(self):
        """Wait for prepare()'s commands; True when this boot made the project's network and found none
        of its containers (a fresh project: up() may start the containers itself)."""
        made = fresh = False
        if self._network_maker is not None:
            made = self._finish(self._network_maker)[0] == 0
            self._network_maker = None
        if self._existing is not None:
            code, out = self._finish(self._existing)
            fresh = code == 0 and not out.strip()
            self._existing = None
        return made and fresh

    def up(self, compose_text, app_env, sockets, port_map=None):
        """Write the rewritten compose file and start the services, detached."""
        port_map = None if self.netns else port_map  # in its own namespace a CVM port is the CVM's
        rewritten = rewrite_compose(compose_text, sockets, port_map)
        atomic_write(self.compose_file, yaml.safe_dump(rewritten, sort_keys=False).encode(), mode=0o600)
        if self.engine == "none":
            return
        env = self._env(app_env)
        if self._prepared():
            plan = podman_run_plan(rewritten, self.project, self.compose_file, env)
            if plan is not None:
                self._run_plan(plan, env, app_env)
                return
        proc = subprocess.run(self._command("up", "-d"), capture_output=True, text=True, cwd=self.work_dir,
                              env=env, timeout=600, check=False)
        # podman-compose echoes its `podman create -e KEY=value` lines: never log its output unscrubbed.
        if proc.returncode != 0:
            raise DstackError("containers", f"{self.engine} compose up failed (exit {proc.returncode}): "
                                            f"{scrub(last_line(proc.stderr or proc.stdout), app_env.values())}")

    def _run_plan(self, plan, env, app_env):
        """Start each container of compose_direct's plan (`podman run -d`, in depends_on order), as
        podman-compose's create and start would; a failure names the container (a failed boot's
        down() removes what was started: the names are podman-compose's)."""
        for container, args in plan:
            try:
                proc = subprocess.run(self._in_netns(self._podman("run", *args)), capture_output=True, text=True,
                                      cwd=self.work_dir, env=env, timeout=600, check=False)
            except subprocess.TimeoutExpired:
                # Not raised as is: its message holds the command line, and so the app's env values.
                raise DstackError("containers", f"podman run {container} took over 600 s (pulling its image?)") from None
            if proc.returncode != 0:
                raise DstackError("containers", f"podman run {container} failed (exit {proc.returncode}): "
                                                f"{scrub(last_line(proc.stderr or proc.stdout), app_env.values())}")

    def load_image(self, path, field):
        """`<engine> load` of an image archive (docker-archive, as `podman save` writes it); returns
        what the engine says it loaded. DstackError(field) when it cannot."""
        if self.engine == "none":
            return ""
        proc = subprocess.run(self._engine("load", "-i", path), capture_output=True, text=True, env=self._env({}),
                              timeout=600, check=False)
        if proc.returncode != 0:
            raise DstackError(field, f"{self.engine} load failed (exit {proc.returncode}): "
                                     f"{last_line(proc.stderr or proc.stdout)}")
        return last_line(proc.stdout or proc.stderr)

    def down(self):
        """Stop and remove the project's containers, then (podman) its networks."""
        if self.engine == "none":
            return
        self._prepared()
        if os.path.exists(self.compose_file):
            subprocess.run(self._command("down"), capture_output=True, text=True, cwd=self.work_dir,
                           env=self._env({}), timeout=300, check=False)
        if self.engine == "podman":
            found = subprocess.run(self._podman("network", "ls", "--filter", f"label={PODMAN_PROJECT_LABEL}={self.project}",
                                                "--format", "{{.Name}}"),
                                   capture_output=True, text=True, env=self._env({}), timeout=60, check=False)
            names = found.stdout.split()
            if names:
                subprocess.run(self._in_netns(self._podman("network", "rm", *names)), capture_output=True, text=True,
                               env=self._env({}), timeout=60, check=False)

    def logs(self, container, tail=LOG_TAIL_DEFAULT, timestamps=False, since=None):
        """The last `tail` lines (stdout then stderr, at most LOG_MAX_BYTES) of one of this project's
        containers, named as ps() names it or by its service; DstackError("container") for any other."""
        if self.engine == "none":
            raise DstackError("container", "this CVM runs no containers")
        names = [name for name, _status in self.ps()]
        found = container if container in names else \
            next((name for name in names if _service_of(name, self.project) == container), None)
        if found is None:
            raise DstackError("container", f"{container[:64]!r} is not one of this app's containers")
        cmd, env = self.logs_command(found, tail=tail, timestamps=timestamps, since=since)
        proc = subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=False)
        if proc.returncode != 0:
            raise DstackError("container", f"{self.engine} logs {found} failed: {last_line(proc.stderr.decode(errors='replace'))}")
        return (proc.stdout + proc.stderr)[-LOG_MAX_BYTES:].decode("utf-8", "replace")

    def logs_command(self, container, tail=None, timestamps=False, since=None, follow=False):
        """(argv, env) of `<engine> logs` for one container (a name ps() gave). The env is the
        runner's (its container settings, never the app's values); `logs` reads the container's log
        file and needs neither the CVM's namespace nor its networks."""
        argv = self._engine("logs")
        if follow:
            argv.append("--follow")
        if tail is not None:
            argv += ["--tail", str(int(tail))]
        if timestamps:
            argv.append("--timestamps")
        if since is not None:
            argv += ["--since", str(since)]
        return argv + [container], self._env({})

    def ps(self):
        """[(container name, status)] of this project's containers."""
        if self.engine == "none":
            return []
        if self.engine == "docker":
            cmd = ["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
                   "--format", "{{.Names}}\t{{.Status}}"]
        else:
            cmd = self._podman("ps", "-a", "--filter", f"label={PODMAN_PROJECT_LABEL}={self.project}",
                               "--format", "{{.Names}}\t{{.Status}}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self._env({}), timeout=60, check=False)
        return [tuple(line.split("\t", 1)) for line in proc.stdout.splitlines() if "\t" in line]


def service_and_number(container, project):
    """(service, n) of a container of `project`: podman-compose names it <project>_<service>_<n>,
    docker compose <project>-<service>-<n>; (None, None) for another's."""
    for sep in ("_", "-"):
        prefix = project + sep
        if container.startswith(prefix):
            service, _sep, number = container[len(prefix):].rpartition(sep)
            if service and number.isdigit():
                return service, number
    return None, None


def _service_of(container, project):
    return service_and_number(container, project)[0]


def scrub(text, secrets):
    """text with every secret value replaced by ***."""
    for value in sorted((v for v in secrets if v and len(v) >= 3), key=len, reverse=True):
        text = text.replace(value, "***")
    return text
