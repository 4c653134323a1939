"""The layout is the architecture: the domain (core) and the contracts stay framework-free, and
nothing in the package imports a layer above it. Checked on the source (AST), so an import
hidden inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "stream_app"
CLIENTS = ("faust", "mode", "aiokafka", "confluent_kafka", "rocksdict", "kafka")
# What each room may import from the rest of stream_app (besides itself).
ALLOWED = {
    "contracts": {"settings", "errors"},
    "core": {"contracts", "settings", "errors"},
    "kafka": {"contracts", "settings", "errors", "logs", "progress"},
    "live": {"contracts", "core", "kafka", "settings", "errors", "logs", "charts"},
    "tools": {
        "contracts",
        "core",
        "live",
        "kafka",
        "settings",
        "errors",
        "logs",
        "progress",
        "charts",
    },
}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(room: str) -> list[Path]:
    return sorted((PACKAGE / room).glob("*.py"))


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_the_rooms_below_it(room: str) -> None:
    assert modules(room), f"stream_app/{room} is empty"
    for path in modules(room):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] != "stream_app" or len(parts) < 2 or parts[1] == room:
                continue
            assert parts[1] in ALLOWED[room], f"{path.name} imports {name}"


@pytest.mark.parametrize("room", ["contracts", "core"])
def test_the_domain_and_the_contracts_use_no_kafka_or_faust_client(room: str) -> None:
    for path in modules(room):
        clients = {n for n in imports(path) if n.split(".")[0] in CLIENTS}
        assert not clients, f"{path.name} imports {sorted(clients)}"


def test_the_rule_would_catch_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from stream_app.live.pipeline import LivePipeline\n    import faust\n"
    )
    assert imports(bad) == {"stream_app.live.pipeline", "faust"}
    assert "live" not in ALLOWED["core"]


UNSAFE_LOADERS = frozenset(
    {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
)


def unsafe_loaders(path: Path) -> set[str]:
    """Modules that turn bytes into code that `path` imports, also through ``__import__`` or
    ``importlib.import_module`` with a literal name."""
    found = {name for name in imports(path) if name.split(".")[0] in UNSAFE_LOADERS}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and node.value in UNSAFE_LOADERS:
            found.add(node.value)
    return found


def test_nothing_in_the_package_imports_pickle() -> None:
    """Model records are JSON (stream_app/contracts/model_record.py): a pickle read from a topic
    runs its writer's code in the worker (issue 14). Nor any other loader of code."""
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 30
    for path in paths:
        found = unsafe_loaders(path)
        assert not found, f"{path.relative_to(PACKAGE)} imports {sorted(found)}"


def test_the_pickle_rule_would_catch_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import importlib\n"
        "def f(data):\n    import pickle\n    return pickle.loads(data)\n"
        "def g():\n    return importlib.import_module('marshal')\n"
    )
    assert unsafe_loaders(bad) == {"pickle", "marshal"}
