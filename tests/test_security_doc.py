"""SECURITY.md makes claims; each must stay backed by a test that exists. A renamed or deleted
test fails here, so the page cannot quietly drift from what is proven."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

DOC = (ROOT / "SECURITY.md").read_text()
REFERENCE = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")
BACKED_SECTIONS = ("What STT1 protects", "How keys are stored", "Rotating and revoking")


def functions_in(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def claims(section: str) -> list[str]:
    """The bullets of one '## section' of SECURITY.md, each as one string."""
    body = DOC.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return ["- " + item for item in re.split(r"^- ", body, flags=re.MULTILINE)[1:]]


def test_every_named_test_exists() -> None:
    references = REFERENCE.findall(DOC)
    assert len(references) >= 40
    missing = [f"{path}::{name}" for path, name in references if name not in functions_in(path)]
    assert missing == []


def test_every_claim_names_a_test() -> None:
    for section in BACKED_SECTIONS:
        bullets = claims(section)
        assert bullets, section
        unbacked = [bullet.splitlines()[0] for bullet in bullets if not REFERENCE.search(bullet)]
        if section == "Rotating and revoking":  # the last bullet is advice, not a claim
            unbacked = [line for line in unbacked if not line.startswith("- **If a credential file leaks")]
        assert unbacked == [], section
