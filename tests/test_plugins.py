"""Adding a family, a form or a backend is one module: the packages find their plug-ins."""

from __future__ import annotations

import importlib
import sys

import pytest

import compressed_experts as ce
from compressed_experts import backends, forms
from compressed_experts.forms.base import Form
from compressed_experts.plugins import discover


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package ``plugpkg`` with one module defining a named Form subclass and one an unnamed one."""
    root = tmp_path / "plugpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "double.py").write_text(
        "from compressed_experts.forms.base import Form\n\n"
        "class Helper(Form):\n    pass\n\n"
        "class Double(Helper):\n    name = 'double'\n    rank = 9\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("plugpkg")
    for name in [n for n in sys.modules if n == "plugpkg" or n.startswith("plugpkg.")]:
        del sys.modules[name]


def test_a_new_module_is_found_and_unnamed_helpers_are_not(package):
    found = discover(package, Form)
    assert [cls.__name__ for cls in found] == ["Double"]


def test_every_module_of_the_plug_in_packages_is_registered():
    assert sorted(forms.REGISTRY) == ["ia3", "none", "slim", "subset"]
    assert forms.FORMS[0] == "ia3"  # the default, by rank
    assert sorted(backends.BACKENDS) == ["decode", "eager", "fused", "grouped", "loop"]
    assert [b.name for b in backends.AUTO] == ["decode", "grouped", "loop"]
    assert sorted(f.model_types[0] for f in ce.FAMILIES) == [
        "deepseek_v3",
        "mixtral",
        "olmoe",
        "phimoe",
        "qwen2_moe",
        "qwen3_moe",
    ]
