"""No agent imports another agent (issue 15 point 8): what two agents share lives in
plugins/module_utils (or in agents/wsgi.py and agents/cli_support.py, the agents' shared plumbing
at agents/ top level), so that each agent's package can be shipped and changed on its own (the
guest image carries agents/guest and module_utils, not the VMM or the verifier)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENTS = ROOT / "agents"
PACKAGE = "ansible_collections.dstack.tee.agents"


def _imported_modules(node, package):
    """The dotted modules one import statement in a module of `package` may load (relative imports
    resolved; `from PKG import name` may load PKG.name, a subpackage)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1])
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    return [module] + [f"{module}.{alias.name}" for alias in node.names]


def _agents_named(modules, agents_dir):
    """The agents (subfolders of agents_dir) that these dotted modules belong to."""
    agents = set()
    for module in modules:
        if module.startswith(PACKAGE + "."):
            first = module[len(PACKAGE) + 1:].split(".", 1)[0]
            if (agents_dir / first).is_dir():
                agents.add(first)
    return agents


def cross_agent_imports(agents_dir=AGENTS):
    """["agents/X/file.py:LINE imports agents/Y: <statement>"] for every import, anywhere in an
    agent's file (top level or inside a function), of another agent's package."""
    found = []
    for agent_dir in sorted(p for p in agents_dir.iterdir() if p.is_dir() and p.name != "__pycache__"):
        for path in sorted(agent_dir.rglob("*.py")):
            rel = path.relative_to(agents_dir.parent)
            package = ".".join([PACKAGE, *path.relative_to(agents_dir).parent.parts])
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for other in sorted(_agents_named(_imported_modules(node, package), agents_dir) - {agent_dir.name}):
                        found.append(f"{rel}:{node.lineno} imports agents/{other}: {ast.unparse(node)}")
    return sorted(found)


def test_no_agent_imports_another_agent():
    found = cross_agent_imports()
    assert not found, ("an agent imports another agent's package; move what they share to "
                       "plugins/module_utils:\n" + "\n".join(found))


def test_the_check_sees_every_form_of_import(tmp_path):
    """The walk finds absolute, `from PKG import agent`, relative and function-level imports, and
    leaves alone the agent's own modules, the shared agents/ modules and module_utils (so that an
    empty result above means there are none, not that the check looks in the wrong place)."""
    agents = tmp_path / "agents"
    (agents / "vmm" / "backends").mkdir(parents=True)
    (agents / "guest").mkdir()
    (agents / "vmm" / "backends" / "process.py").write_text(
        "import os\n"
        f"from {PACKAGE}.guest.compose_runner import ComposeRunner\n"
        f"from {PACKAGE} import guest\n"
        "from ...guest import boot\n"
        f"from {PACKAGE}.vmm import service\n"
        f"from {PACKAGE} import wsgi\n"
        "from ..service import Vmm\n"
        "from ansible_collections.dstack.tee.plugins.module_utils import errors\n")
    (agents / "guest" / "cli.py").write_text(f"def main():\n    import {PACKAGE}.vmm.service\n")
    (agents / "wsgi.py").write_text(f"from {PACKAGE}.guest import cli\n")  # shared: not an agent
    assert cross_agent_imports(agents) == [
        f"agents/guest/cli.py:2 imports agents/vmm: import {PACKAGE}.vmm.service",
        f"agents/vmm/backends/process.py:2 imports agents/guest: from {PACKAGE}.guest.compose_runner import ComposeRunner",
        f"agents/vmm/backends/process.py:3 imports agents/guest: from {PACKAGE} import guest",
        "agents/vmm/backends/process.py:4 imports agents/guest: from ...guest import boot",
    ]
