"""Plugins: parts defined outside the library survive save, load and the recipes.

A checkpoint records the module that registered each part the library does not define;
loading a checkpoint whose part is missing names that module and never imports it;
installed packages register parts through the ``ponder_zoo.plugins`` entry points; every
recipe takes ``--plugin MODULE``. Fresh processes are real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zoo
from zoo.registry import HALTING, REGISTRIES, import_plugins, plugin_parts, require_parts

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial" / "kl_halting.py"

PLUGIN = '''
"""A plugin: a linear gate, registered as halting 'lin_gate'."""
import torch
from zoo.halting.base import HaltingPolicy, HaltStep
from zoo.registry import HALTING


@HALTING.register("lin_gate")
class LinGate(HaltingPolicy):
    def __init__(self, config, threshold=0.5):
        super().__init__(config)
        self.threshold = threshold
        self.units = torch.nn.ModuleList(torch.nn.Linear(config.dim, 1) for _ in range(config.passes - 1))

    def step(self, index, hidden, logits, mask, state, ctx):
        gate = torch.sigmoid(self.units[index](hidden).squeeze(-1))
        return HaltStep(mask=gate >= self.threshold, gate=gate)
'''


@pytest.fixture
def registries():
    """Registrations made by a test leave with it (so do the modules it imported)."""
    saved = {kind: (dict(reg._entries), dict(reg._modules)) for kind, reg in REGISTRIES.items()}
    modules = set(sys.modules)
    yield
    for kind, reg in REGISTRIES.items():
        reg._entries.clear(), reg._modules.clear()
        reg._entries.update(saved[kind][0]), reg._modules.update(saved[kind][1])
    for name in set(sys.modules) - modules:
        sys.modules.pop(name, None)


@pytest.fixture
def plugin_file(tmp_path) -> Path:
    path = tmp_path / "plugins" / "lin_gate_plugin.py"
    path.parent.mkdir()
    path.write_text(PLUGIN)
    return path


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *env.pop("path", [])])}
    environment.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=environment, capture_output=True, text=True
    )


# Checkpoints -----------------------------------------------------------------------------


def test_save_records_the_modules_of_plugin_parts(registries, plugin_file, tmp_path):
    assert import_plugins([str(plugin_file)])[0].__name__ == "lin_gate_plugin"
    assert HALTING.module_of("lin_gate") == "lin_gate_plugin" and not HALTING.is_builtin("lin_gate")
    model = zoo.build("ponder-pythia-tiny", halting="lin_gate", cache="kv_reuse")
    header = json.loads((zoo.save(model, tmp_path / "ckpt") / "config.json").read_text())
    assert header["plugins"] == [{"kind": "halting", "name": "lin_gate", "module": "lin_gate_plugin"}]
    assert plugin_parts(zoo.preset("adaponder-pythia-tiny")) == []  # built-in parts need no record
    loaded = zoo.load(tmp_path / "ckpt")  # registered here: loads, weights and all
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


def test_a_fresh_process_names_the_module_and_loads_once_it_is_imported(plugin_file, tmp_path):
    saved = run_python(
        f"""
        import torch, zoo
        from zoo.registry import import_plugins
        import_plugins([{str(plugin_file)!r}])
        torch.manual_seed(0)
        zoo.save(zoo.build("ponder-pythia-tiny", halting="lin_gate", cache="kv_reuse"), "ckpt")
        """,
        tmp_path,
    )
    assert saved.returncode == 0, saved.stderr
    fresh = run_python("import zoo; zoo.load('ckpt')", tmp_path)
    assert fresh.returncode != 0
    message = fresh.stderr.strip().splitlines()[-1]
    assert message.startswith("ValueError:") and "halting 'lin_gate'" in message
    assert "registered by the module 'lin_gate_plugin'" in message
    assert "import lin_gate_plugin" in message and "--plugin lin_gate_plugin" in message
    imported = run_python(
        "import zoo, lin_gate_plugin; print(type(zoo.load('ckpt').halting).__name__)",
        tmp_path,
        path=[str(plugin_file.parent)],
    )
    assert imported.returncode == 0 and imported.stdout.split() == ["LinGate"], imported.stderr


def test_loading_never_imports_the_module_a_file_names(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "evil_parts.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        config = zoo.preset("ponder-pythia-tiny").to_dict()
        config["halting"] = "evil"
        record = [{"kind": "halting", "name": "evil", "module": "evil_parts"}]
        with pytest.raises(ValueError, match="registered by the module 'evil_parts'"):
            require_parts(config, record, "ckpt/config.json")
        assert not marker.exists() and "evil_parts" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))


def test_missing_parts_without_a_record_and_script_parts(tmp_path):
    config = zoo.preset("ponder-pythia-tiny").to_dict()
    config["cache"] = "kv-reuse"
    with pytest.raises(ValueError, match=r"unknown cache 'kv-reuse' \(did you mean 'kv_reuse'\?\).*--plugin"):
        require_parts(config, None, "old/config.json")
    config["cache"] = "mine"
    record = [{"kind": "cache", "name": "mine", "module": "__main__"}]
    with pytest.raises(ValueError, match="script that saved it .* move the class into a module"):
        require_parts(config, record, "ckpt/config.json")


# Import helpers ----------------------------------------------------------------------------


def test_import_plugins_says_how_to_make_a_module_importable(registries, tmp_path):
    with pytest.raises(ValueError, match=r"cannot import plugin module 'no_such_parts'.*--plugin path/to/no_such_parts\.py"):
        import_plugins(["no_such_parts"])
    with pytest.raises(ValueError, match="does not exist"):
        import_plugins([str(tmp_path / "missing.py")])
    with pytest.raises(ValueError, match="list of modules"):
        import_plugins("kl_halting")
    broken = tmp_path / "needs_more.py"
    broken.write_text("import a_dependency_that_is_missing\n")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"):  # the plugin's own error
        import_plugins([str(broken)])
    assert "needs_more" not in sys.modules


def test_importing_a_plugin_twice_registers_once(registries, plugin_file):
    first = import_plugins([str(plugin_file)])
    again = import_plugins([str(plugin_file), "lin_gate_plugin"])
    assert again == [first[0], first[0]]


# Installed packages ------------------------------------------------------------------------


def test_installed_packages_register_parts_through_entry_points(tmp_path):
    site = tmp_path / "site"
    info = site / "fake_zoo_parts-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-zoo-parts\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ponder_zoo.plugins]\nparts = fake_zoo_parts\n")
    (site / "fake_zoo_parts.py").write_text(
        "from zoo.caches.kv_reuse import KVReuse\n"
        "from zoo.registry import CACHES\n\n"
        "@CACHES.register('installed_reuse')\n"
        "class InstalledReuse(KVReuse):\n"
        "    pass\n"
    )
    found = run_python(
        """
        import zoo
        from zoo.registry import CACHES
        model = zoo.build("adaponder-pythia-tiny", cache="installed_reuse")  # found without an import
        print(CACHES.module_of("installed_reuse"), "installed_reuse" in zoo.available("cache"))
        """,
        tmp_path,
        path=[str(site)],
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["fake_zoo_parts", "True"]


# Recipes ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_plugin_policy_trains_and_generates_through_the_recipes(tmp_path):
    """The tutorial's commands: pretrain with --plugin, then generate with and without it."""
    shutil.copy(TUTORIAL, tmp_path / "kl_halting.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    pretrain = [
        sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--plugin", "kl_halting.py",
        "--model", "ponder-pythia-tiny", "--override", 'halting="kl"', "--override", 'cache="kv_reuse"',
        "--override", 'halting_kwargs={"threshold": 0.001}', "--steps", "4", "--batch-size", "4",
        "--micro-batch-size", "4", "--seq-len", "32", "--eval-windows", "2", "--no-progress", "--out", "runs/kl",
    ]  # fmt: skip
    done = subprocess.run(pretrain, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    header = json.loads(next((tmp_path / "runs" / "kl" / "checkpoints").glob("step-*/model/config.json")).read_text())
    assert header["plugins"] == [{"kind": "halting", "name": "kl", "module": "kl_halting"}]
    generate = [sys.executable, str(ROOT / "recipes" / "generate.py"), "--model", "runs/kl", "--prompt", "def"]
    generate += ["--max-new-tokens", "4"]
    refused = subprocess.run(generate, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "--plugin kl_halting" in refused.stderr
    done = subprocess.run([*generate, "--plugin", "kl_halting.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "passes over 4 tokens" in done.stdout
