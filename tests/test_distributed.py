"""The DeepSpeed start-up patches of vlmft/distributed.py are applied only where the installed
DeepSpeed imports what the stand-ins define."""

from __future__ import annotations

import sys

from vlmft import distributed


def test_the_installed_deepspeed_imports_only_what_the_muon_stubs_define():
    found = distributed.muon_imports()
    assert set(found) == set(distributed.MUON_MODULES), found
    assert set().union(*found.values()) <= distributed.MUON_STUBS, found


def test_a_deepspeed_that_imports_another_name_is_not_stubbed(tmp_path, monkeypatch):
    (tmp_path / "engine.py").write_text(
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam, muon_step\n")
    found = distributed.muon_imports(tmp_path)
    assert found == {"deepspeed.runtime.zero.muon.muon_optimizer": {"MuonWithAuxAdam", "muon_step"}}
    monkeypatch.setattr(distributed, "muon_imports", lambda root=None: found)
    for name in distributed.MUON_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    distributed._avoid_slow_starts()
    assert not any(name in sys.modules and getattr(sys.modules[name], "__file__", None) is None
                   for name in distributed.MUON_MODULES)


def test_init_needs_the_set_up_call(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    try:
        distributed.init()
    except RuntimeError as exc:
        assert "setup_environment" in str(exc)
    else:
        raise AssertionError("init() joined a group without the set-up call")
