"""The package's shape (docs/architecture.md): no module reaches into another's private names,
and nothing outside the model families names a module of one architecture.

The layers themselves are checked by import-linter (`lint-imports`, pyproject.toml).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pinchgate"
# Module names of the CTC models' insides (wav2vec2 & co.): only their family may use them.
ARCHITECTURE_NAMES = (
    "intermediate_dense",
    "output_dense",
    "feature_projection",
    "lm_head",
    "pos_conv_embed",
    "conv_layers",
    "q_proj",
    "out_proj",
    "_get_feat_extract_output_lengths",
    "freeze_feature_encoder()",
)


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _module_names(tree: ast.Module) -> dict[str, str]:
    """Local names bound to pinchgate modules (`from pinchgate import x`, `import ... as`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pinchgate"):
            for alias in node.names:
                candidate = SRC.joinpath(*node.module.split(".")[1:], alias.name)
                if candidate.with_suffix(".py").is_file() or candidate.is_dir():
                    names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pinchgate") and alias.asname:
                    names[alias.asname] = alias.name
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = _module_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pinchgate"):
                found += [
                    f"{path.name}: {node.module}.{a.name}" for a in node.names if _private(a.name)
                ]
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and _private(node.attr)
            ):
                found.append(f"{path.name}: {modules[node.value.id]}.{node.attr}")
    assert found == []


def test_only_the_families_name_the_insides_of_an_architecture():
    found = []
    for path in _sources():
        if "families" in path.relative_to(SRC).parts:
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(SRC)}: {name}" for name in ARCHITECTURE_NAMES if name in text]
    assert found == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """The scanners find a private import and an attribute reach-in when there is one."""
    tree = ast.parse("from pinchgate import masking\nmasking._hidden()\n")
    assert _module_names(tree) == {"masking": "pinchgate.masking"}
    assert any(isinstance(n, ast.Attribute) and _private(n.attr) for n in ast.walk(tree))
