"""Every registered conformance check can be seen to fail: some mutant back-end is expected to fail it (issue 17).

The convention: each test module of this directory that holds mutants defines
``MUTANT_EXPECTATIONS: dict[str, frozenset[str]]``, mutant name -> the clause
ids the mutant makes fail, and its tests assert exactly that set fails.  Here
every ``test_*.py`` module beside this one is imported by path and the union
of those sets is compared with :func:`iovirt.conformance.registry.all_checks`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from iovirt.conformance.registry import all_checks

HERE = Path(__file__).resolve().parent


def _module(path: Path) -> ModuleType:
    """The test module at ``path``, imported under its own name (pytest's name for it too) once."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path:
        return loaded
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # the modules import conftest and their helpers by name, as under pytest
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _expectations() -> dict[str, dict[str, frozenset[str]]]:
    """Test module file name -> its MUTANT_EXPECTATIONS, for the modules that define one."""
    found = {}
    for path in sorted(HERE.glob("test_*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        expectations = getattr(_module(path.resolve()), "MUTANT_EXPECTATIONS", None)
        if expectations is not None:
            found[path.name] = expectations
    return found


def test_mutant_expectations_are_well_formed():
    found = _expectations()
    assert found, "no test module defines MUTANT_EXPECTATIONS"
    bad = [f"{module}: {name!r} -> {clauses!r}" for module, table in found.items() for name, clauses in table.items()
           if not isinstance(clauses, frozenset) or not clauses or not all(isinstance(c, str) for c in clauses)]
    assert not bad, "mutants must map to a non-empty frozenset of clause ids:\n" + "\n".join(bad)


def test_every_registered_check_has_a_mutant():
    covered = {clause for table in _expectations().values() for clauses in table.values() for clause in clauses}
    missing = sorted({(c.func.__module__.rsplit(".", 1)[-1], c.transport, c.clause) for c in all_checks()
                      if c.clause not in covered})
    assert not missing, f"{len(missing)} registered checks have no mutant that makes them fail:\n" + "\n".join(
        f"  {module} ({transport}): {clause}" for module, transport, clause in missing)


def test_no_mutant_names_an_unregistered_clause():
    registered = {c.clause for c in all_checks()}
    stale = sorted(f"  {module}: {name} -> {clause}" for module, table in _expectations().items()
                   for name, clauses in table.items() for clause in clauses if clause not in registered)
    assert not stale, "mutants expect clauses no check is registered for (stale mutants):\n" + "\n".join(stale)
