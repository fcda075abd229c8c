"""Labels from result files (a method name, a backbone, a configuration value) reach every report as plain text:
no `|` splits a Markdown cell, no cell of a CSV starts a spreadsheet formula, no `$` is read as mathtext, and the
page runs only its own inline script. Each test failed on the code before its fix."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.report.leaderboard import write_leaderboard
from tests.test_compare import write_run
from tests.test_report_order import write

RECIPE = {"lr": 0.1, "weight_decay": 0.0, "epochs": 100}


def markdown_tables(md: str) -> list[list[list[str]]]:
    """The rows of each Markdown table, split into cells as GitHub's GFM does (a `\\` escapes the next
    character, an unescaped `|` separates cells), each cell unescaped."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in md.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            cells = re.findall(r"(?:\\.|[^|\\])+", line.strip().strip("|"))
            tables[-1].append([re.sub(r"\\(.)", r"\1", c).strip() for c in cells])
        previous = line
    return tables


def assert_rectangular(md: str) -> list[str]:
    """Every table's rows have as many cells as its header; returns every cell."""
    tables = markdown_tables(md)
    assert tables
    for rows in tables:
        assert all(len(row) == len(rows[0]) for row in rows), rows
    return [cell for rows in tables for row in rows for cell in row]


def piped_board(results: Path) -> None:
    """A method named with a pipe, and lora under two configurations, one of them a value holding a pipe."""
    for seed in (42, 44):
        for task in ("dtd", "svhn"):
            write(results, "lo|ra", task, seed, 60.0)
            write(
                results, "lora", task, seed, 61.0, method_config={"recipe": RECIPE, "x": "a|b" if seed == 42 else "c"}
            )


def test_a_pipe_in_a_label_never_splits_a_markdown_cell(tmp_path):
    results = tmp_path / "r"
    piped_board(results)
    write_leaderboard(results)
    cells = assert_rectangular((results / "leaderboard.md").read_text())
    assert "lo|ra" in cells and "lora" in cells
    assert "fixed-hparams-last-epoch-1seed [x=a|b]" in cells


def test_a_pipe_in_a_variant_never_splits_the_comparison_tables(tmp_path, capsys):
    results = tmp_path / "r"
    for seed in (42, 44):
        for task in ("dtd", "svhn"):
            write(results, "vpt_deep", task, seed, 60.0,
                  method_config={"recipe": RECIPE, "x": "a|b" if seed == 42 else "c"})  # fmt: skip
    assert main(["compare", "--results", str(results)]) == 0
    assert main(["compare", "--results", str(results), "--table", "convpass"]) == 0
    for name in ("compare.md", "compare-convpass.md"):
        cells = assert_rectangular((results / name).read_text())
        assert any("x=a|b" in cell for cell in cells), name


FORMULAS = ('=HYPERLINK("x")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx")


def test_a_label_never_lands_in_a_csv_as_a_formula(tmp_path):
    results = tmp_path / "r"
    for i, name in enumerate(FORMULAS):
        write(results, name, "dtd", 42, 60.0 + i)
    write_leaderboard(results)
    cells = list(csv.reader(io.StringIO((results / "leaderboard.csv").read_bytes().decode(), newline="")))
    methods = [row[0] for row in cells[1:]]
    assert len(cells[0]) > 10 and all(len(row) == len(cells[0]) for row in cells)  # every label in its cell
    assert sorted(methods) == sorted("'" + name.replace("\r", "\n") for name in FORMULAS)
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in cells for cell in row)
    # Numbers stay numbers: the accuracies read back as floats.
    assert pd.read_csv(results / "leaderboard.csv").dtd_mean.dtype == float


def test_compare_csv_prefixes_formulas_and_keeps_negative_numbers(tmp_path, capsys):
    results = tmp_path / "r"
    for seed in (42, 44):
        write_run(results, "vpt_deep", "dtd", seed, 1.0 + seed / 100,
                  backbone={"backbone": "=cmd|' /C calc'!A0", "pretrained": True, "image_size": 224})  # fmt: skip
    assert main(["compare", "--results", str(results)]) == 0
    table = pd.read_csv(results / "compare.csv")
    assert set(table.ours_backbone.dropna()) - {"—"} == {"'=cmd|' /C calc'!A0"}
    assert table["diff"].dtype == float and (table["diff"] < 0).any()
    raw = list(csv.reader(io.StringIO((results / "compare.csv").read_bytes().decode(), newline="")))
    column = raw[0].index("diff")
    assert any(row[column].startswith("-") for row in raw[1:])  # a negative number, not a prefixed text
    assert not any(cell.startswith(("=", "+", "@")) for row in raw for cell in row)


def test_a_dollar_in_a_method_name_is_plain_text_on_the_plot(tmp_path, monkeypatch):
    """`$^$` is malformed mathtext: the plot could not be drawn, and `$x$` would be drawn as a formula."""
    import matplotlib.text

    results = tmp_path / "r"
    write(results, "cost$^$", "dtd", 42, 60.0)
    write(results, "$x$", "dtd", 42, 61.0)
    drawn = []
    draw = matplotlib.text.Text.draw

    def record(self, renderer):
        if self.get_text().endswith("tasks)"):  # the points' labels
            drawn.append((self.get_text(), self.get_parse_math(), self.get_usetex()))
        return draw(self, renderer)

    monkeypatch.setattr(matplotlib.text.Text, "draw", record)
    write_leaderboard(results)
    assert (results / "accuracy_vs_params.png").read_bytes().startswith(b"\x89PNG")
    assert {t for t, *_ in drawn} == {"cost$^$ (1 tasks)", "$x$ (1 tasks)"}
    assert all(not math and not tex for _, math, tex in drawn)


def test_the_page_runs_only_its_own_inline_script_and_style(tmp_path):
    results = tmp_path / "r"
    write(results, "<script>alert(1)</script>", "dtd", 42, 60.0)
    write_leaderboard(results)
    page = (results / "leaderboard.html").read_text()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)[1]
    assert "unsafe-inline" not in policy and "default-src 'none'" in policy
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))

    def allowed(tag: str) -> str:
        (text,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert directives["script-src"] == allowed("script") and directives["style-src"] == allowed("style")
    assert "<script>alert(1)" not in page and page.count("<script") == 1


def test_chromium_runs_the_pages_script_and_no_other(tmp_path):
    """An inline script that is not the page's own is refused by the browser; the page's own still sorts."""
    from benchmark.report import screenshot as browser

    reason = browser.missing()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    results = tmp_path / "r"
    for i, method in enumerate(("lora", "vpt_deep", "full")):
        write(results, method, "dtd", 42, 60.0 + i)
    write_leaderboard(results)
    page = results / "leaderboard.html"
    page.write_text(page.read_text().replace("</body>", "<script>document.title = 'injected';</script></body>"))
    driver = browser.chromium()
    try:
        driver.get(page.as_uri())
        assert driver.title == "peft-bench leaderboard"
        driver.execute_script("document.querySelector('#summary th:nth-child(1)').click()")
        assert driver.execute_script("return document.querySelector('#summary th').getAttribute('aria-sort')")
    finally:
        driver.quit()
