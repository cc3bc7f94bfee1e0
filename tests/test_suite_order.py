"""The suite's own order (conftest.pytest_collection_modifyitems): each pytest-xdist worker's share
starts with slow modules, and modules that share programs or a once-per-session output run in one
worker."""

from __future__ import annotations

import sys
import types

import conftest


class _Item:
    def __init__(self, module: str, name: str, slow: bool):
        self.nodeid, self.slow = f"{module}::{name}", slow

    def get_closest_marker(self, name):
        return object() if name == "slow" and self.slow else None


def _modules(items):
    return list(dict.fromkeys(i.nodeid.split("::")[0] for i in items))


def test_slow_modules_are_dealt_to_the_fronts_of_the_shares_and_partners_stay_together(monkeypatch):
    monkeypatch.setattr(conftest, "TOGETHER", {"d.py": "b.py", "a.py": "e.py", "g.py": "c.py"})
    items = [_Item(m, f"t{k}", slow=(k == 0 and m[0] in "abcde")) for m in
             ("a.py", "b.py", "c.py", "d.py", "e.py", "f.py", "g.py", "h.py", "i.py") for k in range(3)]
    config = types.SimpleNamespace(workerinput={"workercount": 2})
    conftest.pytest_collection_modifyitems(config, items)
    assert len(items) == 27 and len({i.nodeid for i in items}) == 27
    # Worksteal's first shares: the first half (13 of 27 here) and the rest.
    first, second = _modules(items[:13]), _modules(items[13:])
    # a.py with its partner e.py (which comes later), then c.py with the light g.py; b.py with d.py:
    # in turn, partners together.
    assert first[:4] == ["a.py", "e.py", "c.py", "g.py"] and second[:2] == ["b.py", "d.py"]
    assert not set(first[:4]) & set(second) and {"f.py", "h.py", "i.py"} >= set(first[4:]) | set(second[2:])
    # Without pytest-xdist the file order is kept.
    again = list(items)
    conftest.pytest_collection_modifyitems(types.SimpleNamespace(), again)
    assert again == items


def test_a_lazy_module_is_imported_by_its_first_public_attribute_and_not_by_pytest_s_probes(tmp_path, monkeypatch):
    import inspect

    (tmp_path / "lazy_probe_module.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_probe_module", raising=False)
    lazy = conftest.LazyModule("lazy_probe_module")
    # What pytest reads of every module-level object while it collects (wrapped-fixture check).
    assert getattr(lazy, "_mock_name", None) is None and inspect.unwrap(lazy) is lazy
    assert not hasattr(lazy, "__wrapped__") and "lazy_probe_module" not in sys.modules
    assert lazy.VALUE == 42 and sys.modules["lazy_probe_module"].VALUE == 42
