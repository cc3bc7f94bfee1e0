"""The suite's own order (conftest.pytest_collection_modifyitems): each pytest-xdist worker's share
starts with slow modules, and modules that share programs or a once-per-session output run in one
worker."""

from __future__ import annotations

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
    monkeypatch.setattr(conftest, "TOGETHER", {"d.py": "b.py", "a.py": "e.py"})
    items = [_Item(m, f"t{k}", slow=(k == 0 and m[0] in "abcde")) for m in
             ("a.py", "b.py", "c.py", "d.py", "e.py", "f.py", "g.py") for k in range(3)]
    config = types.SimpleNamespace(workerinput={"workercount": 2})
    conftest.pytest_collection_modifyitems(config, items)
    assert len(items) == 21 and len({i.nodeid for i in items}) == 21
    # Worksteal's first shares: the first half (10 of 21 here) and the rest.
    first, second = _modules(items[:10]), _modules(items[10:])
    # a.py with its partner e.py (which comes later), then c.py; b.py with d.py: in turn, partners together.
    assert first[:3] == ["a.py", "e.py", "c.py"] and second[:2] == ["b.py", "d.py"]
    assert not set(first[:3]) & set(second) and {"f.py", "g.py"} >= set(first[3:]) | set(second[2:])
    # Without pytest-xdist the file order is kept.
    again = list(items)
    conftest.pytest_collection_modifyitems(types.SimpleNamespace(), again)
    assert again == items
