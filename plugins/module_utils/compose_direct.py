# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The `podman run` of each container podman-compose 1.6 would create and start for a plain compose.

Why: a CVM boot's containers step is on the boot's critical path, and `podman-compose up -d` costs
0.8-0.9 s here for one service (a new interpreter, then `podman --version`, `podman ps`, two
`podman network exists`, `podman create`, `podman start`) against 0.3-0.4 s for one `podman run -d`.
So for a compose inside the subset below the runner starts each container itself, with the
arguments podman-compose would give it (tests/unit/test_compose_direct.py compares them with
podman-compose's own `--dry-run` on a range of composes): the same names (<project>_<service>_1),
labels (project, service, container number, working dir, config file: `down`, `ps` and `logs`
find them as before), network and alias, environment, mounts, ports, restart policy and command,
started in depends_on order with `--requires`. Anything else (another key, a long syntax, a
variable form beyond ${NAME}, ${NAME:-word}, ${NAME-word}, $NAME and $$, a COMPOSE_* variable,
a relative or missing bind source) returns None and the runner takes podman-compose itself.
The labels podman-compose adds for its own later `up` (its version, config hash, systemd unit)
are left out: the next boot of this CVM finds the containers and takes podman-compose's path.
"""

import os
import re
import shlex

SERVICE_KEYS = frozenset(("image", "environment", "ports", "volumes", "restart", "depends_on", "command"))
TOP_KEYS = frozenset(("services", "version"))
NAME = r"[_a-zA-Z][_a-zA-Z0-9]*"
# What this module interpolates as podman-compose does; any other `$` sends the compose to it.
VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|(?P<named>" + NAME + r")|\{(?P<braced>" + NAME
                      + r")(?:(?P<colon>:?)-(?P<default>[^${}]*))?\})")
VOLUME_MODES = frozenset(("ro", "rw"))


class Unsupported(Exception):
    """The compose uses something this translation leaves to podman-compose."""


def _interpolate(value, env):
    if not isinstance(value, str):
        raise Unsupported("a value that is not a string")

    def substitute(found):
        if found.group("escaped"):
            return "$"
        name = found.group("named") or found.group("braced")
        if name.startswith("COMPOSE_"):
            raise Unsupported("a COMPOSE_* variable (podman-compose sets its own)")
        current = env.get(name)
        if found.group("default") is not None:
            if current is None or (found.group("colon") and current == ""):
                return found.group("default")
        return "" if current is None else str(current)

    result = VARIABLE.sub(substitute, value)
    if "$" in VARIABLE.sub("", value):
        raise Unsupported("a variable form beyond ${NAME}, ${NAME:-word}, ${NAME-word}, $NAME and $$")
    return result


def _environment(service, env):
    """[-e KEY=value, ...] and the interpolation variables of the service's other fields. As
    podman-compose: a list is made a mapping first (KEY=value, or KEY alone for None; the last of a
    key wins); entries the process env does not have are variables for the service's other fields;
    KEY alone passes the process env's value, or nothing."""
    raw = service.get("environment")
    if raw is None:
        return [], env
    if isinstance(raw, list):
        if not all(isinstance(entry, str) for entry in raw):
            raise Unsupported("an environment entry that is not a string")
        raw = dict((entry.split("=", 1) + [None])[:2] for entry in raw)
    if not isinstance(raw, dict):
        raise Unsupported("environment that is neither a mapping nor a list")
    for key, value in raw.items():
        if not isinstance(key, str) or not re.fullmatch(NAME, key) or key.startswith("COMPOSE_") \
                or not (value is None or isinstance(value, (str, int))) or isinstance(value, bool):
            raise Unsupported("an environment entry beyond NAME: string or number")
    # (A number stays a number for podman-compose, which fails where another field refers to it;
    # here it is its text.)
    own = {key: None if value is None else _interpolate(str(value), env) for key, value in raw.items()
           if key not in env}
    subs = dict(env, **own)
    args = []
    for key, value in raw.items():
        if value is not None:
            args.append(f"{key}={_interpolate(str(value), subs)}")
        elif key in env:
            args.append(f"{key}={env[key]}")
    return args, subs


def _volume(entry, env):
    entry = _interpolate(entry, env)
    parts = entry.split(":")
    if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/") \
            or (len(parts) == 3 and parts[2] not in VOLUME_MODES) or not os.path.exists(parts[0]) \
            or os.path.normpath(parts[0]) != parts[0] or os.path.normpath(parts[1]) != parts[1]:
        raise Unsupported("a volume beyond /existing/source:/target[:ro|rw]")
    return entry


def _port(entry, env):
    if isinstance(entry, int) and not isinstance(entry, bool):
        return str(entry)
    if not isinstance(entry, str):
        raise Unsupported("a port in the long syntax")
    return _interpolate(entry, env)


def _depends_on(service):
    raw = service.get("depends_on") or []
    if isinstance(raw, dict):
        for condition in raw.values():
            if not isinstance(condition, dict) or set(condition) - {"condition"} \
                    or condition.get("condition", "service_started") != "service_started":
                raise Unsupported("a depends_on condition other than service_started")
        raw = list(raw)
    if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
        raise Unsupported("depends_on that is neither a list nor a mapping of names")
    return raw


def _all_dependencies(services, name):
    """The services `name` depends on, directly or through others (podman-compose requires them all)."""
    found, todo = set(), list(_depends_on(services[name]))
    while todo:
        dep = todo.pop()
        if dep == name or dep not in services:
            raise Unsupported("a depends_on cycle or unknown service")
        if dep not in found:
            found.add(dep)
            todo.extend(_depends_on(services[dep]))
    return found


def podman_run_plan(doc, project, compose_file, env):
    """[(container name, [`podman run` arguments after "run"])] in start order, or None when the
    compose is not in this module's subset. `doc`: the parsed compose, from `compose_file` (the
    path podman-compose would be given); `env`: the variables podman-compose would interpolate
    with (the runner's process environment)."""
    try:
        return _plan(doc, project, compose_file, env)
    except Unsupported:
        return None


def _plan(doc, project, compose_file, env):
    if not isinstance(doc, dict) or set(doc) - TOP_KEYS or not isinstance(doc.get("services"), dict) \
            or not doc["services"] or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", project):
        raise Unsupported("top-level keys beyond services")
    services = doc["services"]
    for name, service in services.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name) \
                or not isinstance(service, dict) or set(service) - SERVICE_KEYS or not service.get("image"):
            raise Unsupported("a service key beyond " + ", ".join(sorted(SERVICE_KEYS)))
    # A cycle or an unknown service raises Unsupported here (podman-compose names the error).
    dependencies = {name: _all_dependencies(services, name) for name in services}
    # podman-compose's order: by how many services each depends on, directly or not (fewest first),
    # compose order among equals.
    order = sorted(services, key=lambda name: len(dependencies[name]))
    working_dir = os.path.realpath(os.path.dirname(compose_file))
    plan = []
    for name in order:
        service = services[name]
        container = f"{project}_{name}_1"
        environment, subs = _environment(service, env)
        args = ["-d", f"--name={container}"]
        if dependencies[name]:
            args.append("--requires=" + ",".join(f"{project}_{dep}_1" for dep in order if dep in dependencies[name]))
        for label in (f"io.podman.compose.project={project}", f"com.docker.compose.project={project}",
                      f"com.docker.compose.project.working_dir={working_dir}",
                      f"com.docker.compose.project.config_files={compose_file}",
                      "com.docker.compose.container-number=1", f"io.podman.compose.service={name}",
                      f"com.docker.compose.service={name}"):
            args += ["--label", label]
        for item in environment:
            args += ["-e", item]
        volumes = service.get("volumes") or []
        if not isinstance(volumes, list):
            raise Unsupported("volumes that are not a list")
        for entry in volumes:
            args += ["-v", _volume(entry, subs)]
        args.append(f"--network={project}_default:alias={name}")
        ports = service.get("ports") or []
        if not isinstance(ports, list):
            raise Unsupported("ports that are not a list")
        for entry in ports:
            args += ["-p", _port(entry, subs)]
        if service.get("restart") is not None:
            args += ["--restart", _interpolate(service["restart"], subs)]
        image = _interpolate(service["image"], subs)
        if not image or image.startswith("-"):
            raise Unsupported("an image podman would read as an option")
        args.append(image)
        command = service.get("command")
        if isinstance(command, str):
            # Split as written, then each word interpolated (podman-compose's order): a value is
            # one argument, whatever its spaces and quotes.
            try:
                words = shlex.split(command)
            except ValueError:
                raise Unsupported("a command shlex cannot split") from None
            args += [_interpolate(word, subs) for word in words]
        elif isinstance(command, list) and all(isinstance(part, (str, int)) for part in command):
            args += [_interpolate(str(part), subs) for part in command]
        elif command is not None:
            raise Unsupported("a command that is neither a string nor a list")
        plan.append((container, args))
    return plan
