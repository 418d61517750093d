"""compose_direct: the `podman run` arguments the runner gives each container are podman-compose 1.6's
own (its `up -d --dry-run`, run here on the same compose and environment, with podman's calls
recorded instead of made), less the labels only podman-compose's later `up` reads; a compose beyond
the subset gets None (the runner then runs podman-compose itself); the interpolation agrees with
podman-compose's on any string it accepts."""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from hypothesis import given, strategies as st

import podman_compose

from ansible_collections.dstack.tee.plugins.module_utils.compose_direct import Unsupported, _interpolate, podman_run_plan

# Run in a process of its own: podman-compose keeps its state in module globals and os.environ.
DRY_RUN = textwrap.dedent("""
    import asyncio, json, os, sys
    import podman_compose as pc
    calls = []
    async def run(self, podman_args, cmd="", cmd_args=None, log_formatter=None, **kw):
        calls.append([*podman_args, cmd, *(cmd_args or [])])
        return 0
    async def output(self, podman_args, cmd="", cmd_args=None):
        return b"[]" if cmd == "ps" else b""
    pc.Podman.run, pc.Podman.output = run, output
    os.chdir(sys.argv[1])
    os.environ.clear()
    os.environ.update(json.loads(sys.argv[2]))
    # -f as ComposeRunner gives it: the compose file's absolute path.
    asyncio.run(pc.podman_compose.run(["--dry-run", "--in-pod", "false", "-p", sys.argv[3], "-f",
                                       os.path.join(sys.argv[1], "docker-compose.yaml"), "up", "-d"]))
    print(json.dumps(calls))
""")
ONLY_FOR_PODMAN_COMPOSE = ("io.podman.compose.version=", "PODMAN_SYSTEMD_UNIT=", "io.podman.compose.config-hash=")
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "GREETING": "hello world", "EMPTY": "",
       "TOKEN": "s3cr$t {x} --admin 'it\"s"}


def requires_sorted(arg):
    if not arg.startswith("--requires="):
        return arg
    return "--requires=" + ",".join(sorted(arg.removeprefix("--requires=").split(",")))


def podman_compose_creates(folder, compose, env, project="proj"):
    """[(name, args)] of the `podman create` calls podman-compose's `up -d` makes, in its order,
    without its own labels and without the verb."""
    (folder / "docker-compose.yaml").write_text(yaml.safe_dump(compose, sort_keys=False))
    out = subprocess.run([sys.executable, "-c", DRY_RUN, str(folder), json.dumps(env), project], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    creates = []
    for call in json.loads(out.splitlines()[-1]):
        assert call[0] == "create", call
        args = call[1:]
        kept = []
        for i, arg in enumerate(args):
            if arg == "--label" and args[i + 1].startswith(ONLY_FOR_PODMAN_COMPOSE):
                continue
            if i > 0 and args[i - 1] == "--label" and arg.startswith(ONLY_FOR_PODMAN_COMPOSE):
                continue
            # Its --requires lists a set's members (their order varies from run to run): sorted here
            # and in ours.
            kept.append(requires_sorted(arg))
        creates.append((kept[0].removeprefix("--name="), kept))
    return creates


def ours(folder, compose, env, project="proj"):
    plan = podman_run_plan(compose, project, str(folder / "docker-compose.yaml"), env)
    assert plan is not None, "the compose should be in compose_direct's subset"
    for _name, args in plan:
        assert args[0] == "-d"
    return [(name, [requires_sorted(arg) for arg in args[1:]]) for name, args in plan]


SUBSET = [
    # The sample app, as the runner writes it (socket mounted, port mapped).
    {"services": {"web": {"image": "localhost/dstack-hello:latest", "restart": "unless-stopped",
                          "ports": ["127.0.0.1:18080:80"],
                          "environment": {"GREETING": "${GREETING}", "API_TOKEN": "${TOKEN}"},
                          "volumes": ["{sock}:/var/run/dstack.sock"]}}},
    # depends_on (list and service_started mapping), given out of order; commands; env forms.
    {"version": "3.8", "services": {
        "web": {"image": "nginx:${TAG:-1.25}", "depends_on": ["api"], "ports": ["8080:80", "9000/udp"],
                "command": "sh -c 'echo ${GREETING}; exec nginx -g \"daemon off;\"'",
                "environment": ["A=1", "GREETING", "MISSING", "B=${EMPTY:-dflt}", "C=${EMPTY-kept}"]},
        "api": {"image": "api:1", "depends_on": {"db": {"condition": "service_started"}},
                "environment": {"OWN": "own", "REF": "${OWN}/$$HOME/$GREETING", "N": 5},
                "command": ["serve", "--port", 8000, "${OWN}"], "restart": "always",
                "volumes": ["{sock}:/var/run/dstack.sock:ro", "/tmp:/data:rw"]},
        "db": {"image": "postgres:16"}}},
    # A value is one argument of a string command, whatever its spaces and quotes (split, then
    # interpolated); list entries are variables of the service's other fields; the last of a key wins.
    {"services": {"app": {"image": "app:1",
                          "command": "app --token ${TOKEN} --greeting \"$GREETING\" ${EMPTY} ${OWN} 'a b'",
                          "environment": ["OWN=own", "REF=${OWN}", "A=1", "A=2", "NONE", "GREETING"]}}},
    # Order: by the number of services each depends on (podman-compose's), compose order among equals.
    {"services": {"a": {"image": "img", "depends_on": ["b"]}, "c": {"image": "img"}, "b": {"image": "img"},
                  "d": {"image": "img", "depends_on": {"a": {"condition": "service_started"}}}}},
]


@pytest.mark.parametrize("compose", SUBSET, ids=["sample", "depends_on", "values", "order"])
def test_the_arguments_are_podman_composes(tmp_path, compose):
    sock = tmp_path / "dstack.sock"
    sock.touch()
    compose = json.loads(json.dumps(compose).replace("{sock}", str(sock)))
    theirs = podman_compose_creates(tmp_path, compose, ENV)
    assert ours(tmp_path, compose, ENV) == theirs
    assert len(theirs) == len(compose["services"])


@pytest.mark.parametrize("change, why", [
    ({"networks": {"front": {}}}, "top-level networks"),
    ({"volumes": {"data": {}}}, "top-level volumes"),
    ({"name": "other"}, "a project name of its own"),
    ({"x-podman": {"in_pod": True}}, "an extension"),
])
def test_a_top_level_key_beyond_services_takes_podman_compose(tmp_path, change, why):
    compose = {"services": {"web": {"image": "img"}}, **change}
    assert podman_run_plan(compose, "proj", str(tmp_path / "docker-compose.yaml"), ENV) is None, why


@pytest.mark.parametrize("service, why", [
    ({"build": "."}, "no image"),
    ({"image": "img", "env_file": ".env"}, "env_file"),
    ({"image": "img", "container_name": "web"}, "a name of its own"),
    ({"image": "img", "networks": ["front"]}, "networks"),
    ({"image": "img", "network_mode": "host"}, "network_mode"),
    ({"image": "img", "healthcheck": {"test": "true"}}, "a healthcheck"),
    ({"image": "img", "entrypoint": "sh"}, "an entrypoint"),
    ({"image": "img", "volumes": ["data:/data"]}, "a named volume"),
    ({"image": "img", "volumes": ["./data:/data"]}, "a relative bind"),
    ({"image": "img", "volumes": ["/nonexistent/dstack:/data"]}, "a missing bind source (podman-compose makes it)"),
    ({"image": "img", "volumes": [{"type": "bind", "source": "/tmp", "target": "/data"}]}, "a long volume"),
    ({"image": "img", "volumes": ["/tmp:/data:z"]}, "a volume option"),
    ({"image": "img", "ports": [{"target": 80, "published": 8080}]}, "a long port"),
    ({"image": "img", "depends_on": {"db": {"condition": "service_healthy"}}}, "a health condition"),
    ({"image": "img", "depends_on": ["missing"]}, "an unknown dependency"),
    ({"image": "img", "environment": {"A": "${GREETING:?needed}"}}, "an error form"),
    ({"image": "img", "environment": {"A": "${GREETING:+alt}"}}, "an alternative form"),
    ({"image": "img", "environment": {"A": "${COMPOSE_PROJECT_NAME}"}}, "podman-compose's own variables"),
    ({"image": "img", "environment": {"A": True}}, "a boolean"),
    ({"image": "img", "environment": ["COMPOSE_FILE"]}, "podman-compose's own variables, passed"),
    ({"image": "img", "command": "echo 'unclosed"}, "a command shlex cannot split"),
    ({"image": "img", "environment": {"A": "$"}}, "a lone $"),
    ({"image": "img", "restart": 1}, "a restart that is not a string"),
    ({"image": "--privileged"}, "an image podman reads as an option"),
    ({"image": "${EMPTY}"}, "an image that is empty once interpolated"),
])
def test_a_service_beyond_the_subset_takes_podman_compose(tmp_path, service, why):
    compose = {"services": {"web": service}}
    assert podman_run_plan(compose, "proj", str(tmp_path / "docker-compose.yaml"), ENV) is None, why


def test_a_dependency_cycle_takes_podman_compose(tmp_path):
    compose = {"services": {"a": {"image": "img", "depends_on": ["b"]}, "b": {"image": "img", "depends_on": ["a"]}}}
    assert podman_run_plan(compose, "proj", str(tmp_path / "docker-compose.yaml"), ENV) is None


VARIABLE_TEXT = st.text(alphabet="$ab_{}:-?+ 1", max_size=14)


@given(VARIABLE_TEXT, st.dictionaries(st.sampled_from(["a", "b", "a_1", "_"]), st.sampled_from(["", "x", "$y", None])))
def test_interpolation_agrees_with_podman_compose_wherever_it_answers(text, env):
    try:
        mine = _interpolate(text, env)
    except Unsupported:
        return
    assert mine == podman_compose.rec_subs(text, env)
