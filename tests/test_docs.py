"""The documentation cannot rot: every ```python block on the site runs here.

Blocks of one page run in order in one namespace, in a temporary working directory. A
block preceded by the line ``<!-- no-run -->`` is shown but not run (kept for commands that
need a GPU or a model hub). A block whose only line is a snippet include
(``--8<-- "docs/tutorial/kl_halting.py"``) runs as that file, imported once.

The tutorial's halting policy is also held to the properties every policy must have
(``zoo.testing.check_policy``), and its decision rule to an independent computation of
the KL.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo
from zoo.halting.base import PassContext
from zoo.registry import REGISTRIES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIAL = DOCS / "tutorial" / "kl_halting.py"
FIGURE_SCRIPT = DOCS / "figures" / "make_figures.py"
DEPTH_SCRIPT = DOCS / "figures" / "policy_depths.py"
DEPTH_NUMBERS = DOCS / "figures" / "policy_depths.json"
NO_RUN = "<!-- no-run -->"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")
_SNIPPET = re.compile(r"""^--8<--[ \t]+["']?(?P<path>[^"'\s]+)["']?[ \t]*$""")


# Collecting blocks ---------------------------------------------------------------------------


@dataclass
class Block:
    """One fenced code block of a page."""

    page: str  # path relative to the repository root
    number: int  # 1-based among the page's python blocks
    line: int  # 1-based line of the opening fence
    code: str
    run: bool
    include: Path | None  # the file a snippet-include block stands for

    @property
    def where(self) -> str:
        return f"{self.page}, python block {self.number} (line {self.line})"


def python_blocks(text: str, page: str) -> list[Block]:
    """The ```python blocks of a markdown page, in order, indentation (tabs, admonitions) removed."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"]
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        if lang.lower() not in ("python", "py"):
            continue
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        code = "\n".join(body) + "\n"
        snippet = _SNIPPET.match(code.strip()) if code.strip().count("\n") == 0 else None
        include = ROOT / snippet["path"] if snippet else None
        blocks.append(Block(page, len(blocks) + 1, start + 1, code, previous != NO_RUN, include))
    return blocks


def site_pages() -> list[Path]:
    """Every markdown page of the site."""
    return sorted(DOCS.rglob("*.md"))


def runnable_pages() -> list[str]:
    return [
        str(p.relative_to(ROOT))
        for p in site_pages()
        if any(b.run for b in python_blocks(p.read_text(), str(p.relative_to(ROOT))))
    ]


# Keeping the registries as they were ---------------------------------------------------------

_LOADED: dict[Path, object] = {}


@pytest.fixture(autouse=True, scope="module")
def _restore_registries():
    """Parts registered by doc pages and the tutorial (``kl``) leave with this module.

    Registries have no public removal (a name is registered once, where its class is
    defined), so the snapshot is restored through the private table, here only.
    """
    saved = {kind: dict(reg._entries) for kind, reg in REGISTRIES.items()}
    yield
    for kind, reg in REGISTRIES.items():
        reg._entries.clear()
        reg._entries.update(saved[kind])
    for path in list(_LOADED):
        sys.modules.pop(_module_name(path), None)
    _LOADED.clear()


def _module_name(path: Path) -> str:
    if path.parent == TUTORIAL.parent:  # as a reader imports it: ``import kl_halting``
        return path.stem
    return "docs_" + "_".join(path.relative_to(DOCS).with_suffix("").parts)


def load_file(path: Path):
    """Imports a documentation file once (its registrations happen once)."""
    if path not in _LOADED:
        name = _module_name(path)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _LOADED[path] = module
    return _LOADED[path]


# Running the pages ---------------------------------------------------------------------------


@pytest.mark.parametrize("page", runnable_pages())
def test_page_examples_run(page: str, tmp_path, monkeypatch) -> None:
    """Each python block of the page runs, in order, in one namespace.

    Parts the page registers (and files it imports) leave with it, so that a page that
    lists ``zoo.available(...)`` sees the same parts whatever pages ran before it.
    """
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    registered = {kind: dict(reg._entries) for kind, reg in REGISTRIES.items()}
    loaded = set(_LOADED)
    try:
        for block in python_blocks((ROOT / page).read_text(), page):
            if not block.run:
                continue
            try:
                if block.include is not None:
                    module = load_file(block.include)
                    namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
                else:
                    exec(compile(block.code, block.where, "exec"), namespace)
            except Exception:
                pytest.fail(f"{block.where} failed:\n{block.code}\n{traceback.format_exc()}", pytrace=False)
    finally:
        for kind, reg in REGISTRIES.items():
            reg._entries.clear()
            reg._entries.update(registered[kind])
        for path in set(_LOADED) - loaded:
            sys.modules.pop(_module_name(path), None)
            del _LOADED[path]


def test_collector_reads_fences_markers_and_snippets() -> None:
    page = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            "<!-- no-run -->",
            "",
            "```python",
            "raise SystemExit",
            "```",
            "```bash",
            "make test",
            "```",
            '=== "Tab"',
            "",
            "    ```python",
            "    b = a + 1",
            "",
            "    ```",
            "```python",
            '--8<-- "docs/tutorial/kl_halting.py"',
            "```",
        ]
    )
    blocks = python_blocks(page, "page.md")
    assert [b.run for b in blocks] == [True, False, True, True]
    assert [b.line for b in blocks] == [1, 6, 14, 18]
    assert blocks[2].code == "b = a + 1\n\n"
    assert blocks[3].include == TUTORIAL and blocks[0].include is None


def test_every_page_is_in_the_nav_and_examples_exist() -> None:
    """A page missing from the nav would be built but unreachable; the site has examples."""
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [
        str(p.relative_to(DOCS))
        for p in site_pages()
        if str(p.relative_to(DOCS)) not in nav
    ]
    assert not missing, f"pages not in mkdocs.yml nav: {missing}"
    assert len(runnable_pages()) >= 10


# Figures ---------------------------------------------------------------------------------------


def _figure_names() -> list[str]:
    module = load_file(FIGURE_SCRIPT)
    return sorted(module.FIGURES)


def test_figures_are_committed_and_shown_with_their_command() -> None:
    pages = {p: p.read_text() for p in site_pages()}
    for name in _figure_names():
        assert (DOCS / "figures" / name).is_file(), f"docs/figures/{name} is missing; run make_figures.py"
        showing = [p for p, text in pages.items() if f"figures/{name}" in text]
        assert showing, f"no page shows docs/figures/{name}"
        for page in showing:
            assert "docs/figures/make_figures.py" in pages[page], (
                f"{page.relative_to(ROOT)} shows {name} without the command that regenerates it"
            )


def test_figures_match_the_script(tmp_path) -> None:
    """The committed figures are what the script draws now (regenerate them if this fails)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLCONFIGDIR=str(tmp_path / "mpl"))
    subprocess.run(
        [sys.executable, str(FIGURE_SCRIPT), "--out", str(tmp_path)], check=True, cwd=ROOT, env=env,
        capture_output=True,
    )
    for name in _figure_names():
        fresh, committed = (tmp_path / name).read_bytes(), (DOCS / "figures" / name).read_bytes()
        assert fresh == committed, (
            f"docs/figures/{name} is stale: run `python docs/figures/make_figures.py` and commit it"
        )


# Depth figures of the demo model (policy_depths.py) ---------------------------------------------


def test_depth_figures_are_committed_and_shown_with_their_commands() -> None:
    """Each figure is on its pages with the two commands that regenerate it and its numbers."""
    script = load_file(DEPTH_SCRIPT)
    numbers = json.loads(DEPTH_NUMBERS.read_text())
    assert numbers["figures"] == {name: list(keys) for name, (keys, _) in script.FIGURES.items()}
    assert not set(script.FIGURES) & set(_figure_names()), "depth figures need the trained demo"
    for name, (keys, pages) in script.FIGURES.items():
        assert (DOCS / "figures" / name).is_file(), f"docs/figures/{name} is missing; run policy_depths.py"
        for page in pages:
            text = (ROOT / page).read_text()
            assert f"figures/{name}" in text, f"{page} does not show {name}"
            assert "make demo" in text and "docs/figures/policy_depths.py" in text, (
                f"{page} shows {name} without the commands that regenerate it"
            )
            for key in keys:
                perplexity = f"{numbers['evaluations'][key]['report']['perplexity']:.3f}"
                assert perplexity in text, f"{page} does not quote {key}'s measured perplexity {perplexity}"


def test_depth_numbers_are_consistent() -> None:
    from zoo.halting.fixed_prune import expected_depth

    numbers = json.loads(DEPTH_NUMBERS.read_text())
    evaluations = numbers["evaluations"]
    for name, entry in evaluations.items():
        report, shares = entry["report"], entry["depth_share"]
        assert len(shares) == report["passes"] and sum(shares) == pytest.approx(1.0, abs=1e-12), name
        assert shares == pytest.approx([c / report["tokens"] for c in report["depth_counts"]]), name
        mean = sum(d * share for d, share in enumerate(shares, 1))
        assert mean == pytest.approx(report["mean_depth"], rel=1e-12), name
        assert report["tokens"] == numbers["eval"]["tokens"], name
        assert report["perplexity"] == pytest.approx(math.exp(report["nll"])), name
        assert report["compute_saved"] == pytest.approx(1 - report["compute_vs_full"]), name
    # fixed_prune runs at mlp_gate's measured mean depth, in expectation.
    fixed, gates = evaluations["fixed_prune"], evaluations["mlp_gate"]["report"]
    assert fixed["target_mean_depth"] == gates["mean_depth"]
    assert expected_depth(fixed["halting_kwargs"]["ratio"], gates["passes"]) == pytest.approx(
        gates["mean_depth"], abs=1e-9
    )
    assert evaluations["none"]["report"]["mean_depth"] == 4.0
    assert evaluations["act"]["training"]["train"]["train_only"] == ["halting."]


@pytest.mark.slow
def test_depth_script_runs_on_a_fresh_demo(tmp_path) -> None:
    """A 4-step demo, then the script on it as a reader runs it (a subprocess)."""
    spec = importlib.util.spec_from_file_location("docs_test_recipe_demo", ROOT / "recipes" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(demo)
        run = tmp_path / "demo"
        args = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2"]
        assert demo.main([*args, "--new-tokens", "4", "--out", str(run)]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    out = tmp_path / "figures"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLCONFIGDIR=str(tmp_path / "mpl"))
    command = [sys.executable, str(DEPTH_SCRIPT), "--run", str(run), "--out", str(out)]
    small = ["--act-steps", "2", "--eval-windows", "2"]
    done = subprocess.run([*command, *small], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    numbers = json.loads((out / "policy_depths.json").read_text())
    assert numbers["run"]["step"] == 4 and numbers["eval"]["tokens"] == 2 * 32
    assert numbers["evaluations"]["act"]["training"]["train"]["steps"] == 2
    for name, keys in numbers["figures"].items():
        assert (out / name).read_text().startswith("<?xml"), name
        assert all(key in numbers["evaluations"] for key in keys)


def test_depth_script_without_a_demo_run_says_what_to_do(tmp_path) -> None:
    script = load_file(DEPTH_SCRIPT)
    with pytest.raises(SystemExit, match="run `make demo` first, or pass --run"):
        script.main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# The tutorial's policy -------------------------------------------------------------------------


def kl_model(cache: str, threshold: float, passes: int = 4, recurrence: str = "ponder", seed: int = 0):
    load_file(TUTORIAL)
    torch.manual_seed(seed)
    return zoo.build(
        "ponder-pythia-tiny",
        recurrence=recurrence,
        passes=passes,
        halting="kl",
        cache=cache,
        halting_kwargs={"threshold": threshold},
    ).eval()


def reference_kl(model, ids: torch.Tensor, index: int) -> torch.Tensor:
    """KL(p^{index-1} || p^index) per token, from the same weights run with 'none' halting."""
    log_probs = []
    for passes in (index, index + 1):
        plain = zoo.build("ponder-pythia-tiny", passes=passes, halting="none", cache=model.config.cache)
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            log_probs.append(torch.log_softmax(plain(ids, execution="dense").logits.float(), -1))
    previous, current = log_probs
    return (previous.exp() * (previous - current)).sum(-1)


thresholds = st.sampled_from([1e-4, 3e-4, 4e-4, 5e-4, 1e-3])
id_batches = st.integers(1, 3).flatmap(
    lambda b: st.integers(1, 20).flatmap(
        lambda t: st.lists(st.lists(st.integers(0, 511), min_size=t, max_size=t), min_size=b, max_size=b)
    )
)


def test_kl_policy_passes_the_kit() -> None:
    """Deterministic, monotone, causal, row-independent, sparse == dense == decoding, trains."""
    load_file(TUTORIAL)
    from zoo.testing import check_policy

    # The kit's tiny models have a sharpened head: their predictions move by larger KLs.
    kwargs = st.fixed_dictionaries({"threshold": st.sampled_from([0.1, 1.0, 3.0])})
    report = check_policy("kl", kwargs, examples=12)
    assert report.halted_share > 0.05, report


@settings(max_examples=12, deadline=None)
@given(ids=id_batches, cache=st.sampled_from(["kv_reuse", "recompute"]), threshold=thresholds)
def test_kl_policy_runs_pass_one_and_adds_no_gate_or_loss(ids, cache, threshold) -> None:
    model = kl_model(cache, threshold)
    with torch.no_grad():
        out = model(torch.tensor(ids), execution="dense")
    assert out.masks[0].all() and out.masks[1].all(), "pass 0 has nothing to compare with: every token runs pass 1"
    assert ((out.depth >= 2) & (out.depth <= 4)).all()
    assert torch.equal(out.gates, torch.ones_like(out.gates))
    assert out.aux_loss.item() == 0.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), threshold=thresholds)
def test_kl_policy_keeps_the_distribution_of_its_last_pass(seed, threshold) -> None:
    """Through the driver: a halted token's stored distribution is that of its last pass."""
    from zoo.testing import run_policy

    policy = load_file(TUTORIAL).KLHalting(zoo.preset("ponder-pythia-tiny"), threshold=threshold)
    g = torch.Generator().manual_seed(seed)
    B, T, V = 2, 6, 512
    logits = [3 * torch.randn(B, T, V, generator=g) for _ in range(3)]
    mask = torch.rand(B, T, generator=g) < 0.8
    result = run_policy(policy, [torch.zeros(B, T, 64)] * 3, logits, mask=mask)
    depth = result.masks.sum(0)  # (B, T); a token ran pondering passes 0 .. depth - 1 (at most 2)
    for b in range(B):
        for t in range(T):
            last = min(int(depth[b, t]), 3) - 1
            expected = torch.log_softmax(logits[last][b, t], -1) if last >= 0 else torch.zeros(V)
            torch.testing.assert_close(result.state["log_probs"][b, t], expected)


@pytest.mark.parametrize("cache", ["kv_reuse", "recompute"])
def test_kl_policy_decides_by_the_kl_between_passes(cache) -> None:
    """With 3 passes a token runs the third one exactly when KL(p^0 || p^1) >= threshold."""
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    probe = kl_model(cache, 0.0, passes=3)
    kl = reference_kl(probe, ids, 1)
    threshold = kl.median().item()  # about half the tokens halt
    model = kl_model(cache, threshold, passes=3)
    model.load_state_dict(probe.state_dict())
    with torch.no_grad():
        depth = model(ids, execution="dense").depth
    assert torch.equal(depth, torch.where(kl >= threshold, 3, 2))
    assert 0 < (depth == 2).sum() < depth.numel()


@pytest.mark.parametrize("cache", ["kv_reuse", "recompute"])
def test_kl_policy_limits_are_plain_models(cache) -> None:
    """threshold 0 never halts (4-pass PonderLM); an infinite one halts all after pass 1."""
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    never = kl_model(cache, 0.0)
    always = kl_model(cache, float("inf"))
    always.load_state_dict(never.state_dict())
    four = zoo.build("ponder-pythia-tiny", halting="none", cache=cache)
    two = zoo.build("ponder-pythia-tiny", passes=2, halting="none", cache=cache)
    for plain in (four, two):
        plain.load_state_dict(never.state_dict())
    with torch.no_grad():
        assert (never(ids, execution="dense").depth == 4).all()
        torch.testing.assert_close(never(ids, execution="dense").logits, four(ids, execution="dense").logits)
        out = always(ids, execution="dense")
        assert (out.depth == 2).all()
        if cache == "kv_reuse":  # frozen after pass 1: exactly the 2-pass model
            torch.testing.assert_close(out.logits, two(ids, execution="dense").logits)


def test_kl_policy_rejects_a_bad_threshold() -> None:
    with pytest.raises(ValueError, match="threshold"):
        kl_model("kv_reuse", -1.0)
