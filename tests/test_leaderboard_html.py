"""`leaderboard.html`: generated from result files on disk, and checked in headless Chromium when installed."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.papers.reference import load_reference
from benchmark.report.format import format_mean_std
from benchmark.report.html import explain_protocol
from benchmark.report.leaderboard import write_leaderboard
from benchmark.report.plot_style import CATEGORY_STYLE, category
from methods import list_methods
from tasks import get_task

# (method, protocol, per-task mean accuracy, tunable parameters): four methods, two protocols.
ROWS = (("linear", "grid", 60.0, 0), ("vpt_deep", "grid", 72.0, 92_160), ("pgn", "final", 70.0, 300_000),
        ("full", "grid", 74.0, 85_798_656))  # fmt: skip
TASKS = ("cifar100", "dtd", "svhn", "eurosat", "clevr_count")
SEEDS = (42, 44)


def write_records(results: Path, rows=ROWS, seeds=SEEDS) -> None:
    """Result files as `benchmark.run.runner.execute` writes them, with provenance, speed and memory."""
    for method, protocol, mean, tunable in rows:
        for t, task in enumerate(TASKS):
            for s, seed in enumerate(seeds):
                failed = method == "full" and task == "svhn" and seed == 44
                record = {
                    "schema": 1, "method": method, "task": task, "group": get_task(task).group, "seed": seed,
                    "protocol": protocol, "mode": "final", "status": "failed" if failed else "ok",
                    "test_acc": None if failed else mean + t - 2 + (s - 0.5) * 2, "val_acc": None,
                    "params": {"tunable": tunable, "head": 7690, "backbone": 85_798_656, "nonzero_tunable": tunable},
                    "config": {"backbone": "vit_base_patch16_224.orig_in21k", "pretrained": True, "image_size": 224},
                    "train_images_per_s": 100.0 + t, "peak_memory_mb": 2000.0 + s, "peak_memory_kind": "process peak RSS",
                    "finished_at": f"2026-11-2{s}T10:00:00+00:00",
                    "provenance": {"git_commit": "0123456789abcdef", "git_dirty": False, "versions": {"peft-bench": "0.1.0"}},
                }  # fmt: skip
                path = results / "runs" / method / task / f"{protocol}-s{seed}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record))


class _Tables(HTMLParser):
    """The text of every table cell, by table id, and whether the page loads anything."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.current: str | None = None
        self.in_cell = False
        self.fetches: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if (tag == "script" and "src" in a) or (tag == "link" and a.get("rel") != "icon") or tag == "img":
            self.fetches.append(tag)
        if tag == "table":
            self.current = a["id"]
            self.tables[self.current] = []
        elif tag == "tr" and self.current:
            self.tables[self.current].append([])
        elif tag in ("td", "th") and self.current:
            self.in_cell = True
            self.tables[self.current][-1].append("")

    def handle_endtag(self, tag: str) -> None:
        self.in_cell = self.in_cell and tag not in ("td", "th")
        self.current = None if tag == "table" else self.current

    def handle_data(self, data: str) -> None:
        if self.in_cell:
            self.tables[self.current][-1][-1] += data


def parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def test_page_holds_the_leaderboards_rows_without_javascript(tmp_path):
    results = tmp_path / "r"
    write_records(results)
    board = write_leaderboard(results)
    page = (results / "leaderboard.html").read_text()
    tables = parse(page)
    assert tables.fetches == [] and not re.search(r"(src|href)=\"(https?:)?//", page)
    summary = tables.tables["summary"]
    header = summary[0]
    assert header[:3] == ["method", "protocol", "tasks"] and {"avg (tasks)", "train img/s", "peak MB"} <= set(header)
    # The same rows, in the same order, as the markdown's frame; the numbers are the frame's.
    assert [r[0] for r in summary[1:]] == list(board.method)
    avg = header.index("avg (tasks)")
    assert [r[avg] for r in summary[1:]] == [
        format_mean_std(m, s) for m, s in zip(board.avg_tasks_mean, board.avg_tasks_std, strict=True)
    ]
    full = summary[1:][list(board.method).index("full")]
    assert full[header.index("failed")] == "1" and full[header.index("tasks")] == "5/19"
    per_task = tables.tables["per-task"]
    assert per_task[0] == ["method", "protocol", *TASKS]
    # A per-task cell's title gives its seeds: svhn of `full` lost one.
    assert re.search(r'title="1 seed">73\.0</td>', page) and 'title="2 seeds"' in page
    # Header: backbone, tasks present, the protocols explained, dates and the suite's commit.
    assert (
        "vit_base_patch16_224.orig_in21k, 224 px" in page and "5/19: cifar100, dtd, svhn, eurosat, clevr_count" in page
    )
    assert "2026-11-20 to 2026-11-21" in page and "peft-bench 0.1.0, 0123456789" in page
    assert (
        f"<code>fixed-hparams-last-epoch-2seeds</code>: {html.escape(explain_protocol('fixed-hparams-last-epoch-2seeds'))}"
        in page
    )
    # The plot: one filled point per row, the Pareto front through the rows no smaller row beats.
    assert page.count('class="pt ours"') == len(board) and 'class="pt reported"' not in page
    front = re.search(r'<polyline id="pareto" points="([^"]+)"', page)[1].split()
    assert len(front) == 3  # linear, vpt_deep, full; pgn is below vpt_deep, which is smaller


def test_protocol_lines():
    assert "mean of 5 seeds" in explain_protocol("val-tuned-last-epoch-5seeds")
    assert "1 seed" in explain_protocol("val-tuned-last-epoch-1seed (quick budget)")
    assert "`quick`" in explain_protocol("val-tuned-last-epoch-1seed (quick budget)")
    assert "no tuning" in explain_protocol("fixed-hparams-last-epoch-3seeds")
    assert "selected on test" in explain_protocol("best-test-every10-1seed")


@pytest.mark.parametrize("case", ["missing", "empty", "failing"])
def test_bad_input_leaves_no_page(tmp_path, capsys, monkeypatch, case):
    """One line, exit 2, and no leaderboard.html (nor a temporary file) when the results cannot be read."""
    results = tmp_path / "r"
    if case == "empty":
        results.mkdir()
    if case == "failing":
        write_records(results)
        bad = results / "runs" / "linear" / "dtd" / "grid-s42.json"
        bad.write_text(bad.read_text()[:40])

        # Strict validation of result files turns this file into a user error; stand in for it here.
        def strict(path):
            from benchmark.core.errors import UserError

            raise UserError(f"{bad} is not valid JSON; delete it and rerun the sweep")

        monkeypatch.setattr("benchmark.report.leaderboard.load_results", strict)
    assert main(["leaderboard", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not list(tmp_path.rglob("*.html")) and not list(tmp_path.rglob("*.tmp"))


def test_nothing_is_written_when_the_page_cannot_be_built(tmp_path, monkeypatch):
    """Every file's content is built before the first is written: a failure leaves the directory as it was."""
    results = tmp_path / "r"
    write_records(results)

    def broken(board, meta):
        raise RuntimeError("boom")

    monkeypatch.setattr("benchmark.report.leaderboard.html_page", broken)
    with pytest.raises(RuntimeError):
        write_leaderboard(results)
    assert sorted(p.name for p in results.iterdir()) == ["runs"]


# -- in headless Chromium ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium session for the module, on a page with our rows and the papers' rows of their methods."""
    from benchmark.report import screenshot as browser

    reason = browser.missing()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    results = tmp_path_factory.mktemp("page")
    write_records(results)
    board = write_leaderboard(results, reference=load_reference())
    driver = browser.chromium()
    driver.get((results / "leaderboard.html").as_uri())
    yield driver, board, (results / "leaderboard.html").as_uri()
    driver.quit()


def column(driver, table: str, header: str) -> list[float]:
    """The sort values of a column's shown rows, top to bottom."""
    return driver.execute_script(
        """const [table, header] = arguments;
        const th = Array.from(document.querySelectorAll(`#${table} th`)).find((h) => h.textContent === header);
        const i = th.cellIndex;
        return Array.from(document.querySelectorAll(`#${table} tbody tr`)).filter((r) => !r.hidden)
            .map((r) => Number(r.cells[i].dataset.v));""",
        table,
        header,
    )


def test_page_in_chromium(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    driver, board, uri = browser
    ours, reported = (board.kind == "ours").sum(), (board.kind == "reported").sum()
    assert reported > 0 and len(driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")) == ours + reported
    # Sorting by `avg (tasks)`: descending on the first click, ascending on the second.
    th = driver.find_element(By.XPATH, "//table[@id='summary']//th[normalize-space()='avg (tasks)']")
    th.click()
    down = column(driver, "summary", "avg (tasks)")
    assert th.get_attribute("aria-sort") == "descending" and down == sorted(down, reverse=True)
    th.click()
    up = column(driver, "summary", "avg (tasks)")
    assert th.get_attribute("aria-sort") == "ascending" and up == sorted(up) and up != down
    # The text filter hides the rows (and their points) that do not match.
    driver.find_element(By.ID, "filter").send_keys("vpt_deep")
    shown = [r for r in driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr") if r.is_displayed()]
    assert 0 < len(shown) < ours + reported and all("vpt_deep" in r.text for r in shown)
    assert all(
        p.is_displayed() == ("vpt_deep" in p.get_attribute("data-tip"))
        for p in driver.find_elements(By.CSS_SELECTOR, ".pt")
    )
    driver.find_element(By.ID, "filter").clear()
    driver.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    # The protocol filter: only pgn ran `final`.
    Select(driver.find_element(By.ID, "protocol-filter")).select_by_value("fixed-hparams-last-epoch-2seeds")
    shown = [r for r in driver.find_elements(By.CSS_SELECTOR, "#per-task tbody tr") if r.is_displayed()]
    assert [r.text.split()[1] for r in shown] == ["pgn"]
    Select(driver.find_element(By.ID, "protocol-filter")).select_by_value("")
    # The plot: one filled point per row of ours, one hollow one per reported row with a parameter count.
    points = driver.find_elements(By.CSS_SELECTOR, ".pt.ours")
    placeable = board[(board.kind == "reported") & (board.tunable > 0)]
    assert len(points) == ours and len(driver.find_elements(By.CSS_SELECTOR, ".pt.reported")) == len(placeable)
    tooltip = driver.find_element(By.ID, "tooltip")
    assert not tooltip.is_displayed()
    best = board[board.kind == "ours"].iloc[0]
    ActionChains(driver).move_to_element(driver.find_element(By.CSS_SELECTOR, '.pt[data-key="r0"]')).perform()
    assert tooltip.is_displayed()
    assert tooltip.text.splitlines()[:2] == [best.method, best.protocol] and "seeds" in tooltip.text
    assert "accuracy" in tooltip.text and "params" in tooltip.text
    # The reported rows' toggle hides and shows their markers and rows.
    toggle = driver.find_element(By.ID, "show-reported")
    toggle.click()
    assert not any(p.is_displayed() for p in driver.find_elements(By.CSS_SELECTOR, ".pt.reported"))
    assert not any(r.is_displayed() for r in driver.find_elements(By.CSS_SELECTOR, "tr.reported"))
    assert all(p.is_displayed() for p in points)
    toggle.click()
    assert all(p.is_displayed() for p in driver.find_elements(By.CSS_SELECTOR, ".pt.reported"))
    # No console message and no request but the page itself.
    assert [e["message"] for e in driver.get_log("browser")] == []
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert requests == [uri]


# -- a crowded plot, in headless Chromium ---------------------------------------------------------------------------
def crowd() -> tuple[tuple[str, str, float, int], ...]:
    """Every registered method and two unregistered names (`other`), near one another: 68 to 72 % at 50k to 500k."""
    names = [*list_methods(), "arc", "snell"]
    return tuple(
        (name, "grid", 68 + 4 * ((i * 7) % 11) / 10, int(50_000 * 10 ** (((i * 5) % 13) / 12)))
        for i, name in enumerate(names)
    )


def test_crowded_plot_in_chromium(tmp_path):
    """40 methods crowded together: no two labels intersect, all stay in the plot, the Pareto front is labelled; one
    colour per family, distinct (colour, marker) pairs inside one, and a reported point drawn as our point of its
    method (hollow)."""
    from benchmark.report import screenshot as browser

    reason = browser.missing()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    write_records(tmp_path, rows=crowd(), seeds=SEEDS[:1])
    write_leaderboard(tmp_path, reference=load_reference())
    driver = browser.chromium()
    try:
        driver.get((tmp_path / "leaderboard.html").as_uri())
        labels, area, points = driver.execute_script(
            """const plot = document.getElementById("plot");
            const box = (e) => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
            const grid = Array.from(plot.querySelectorAll("line.grid")).map(box);
            const area = [Math.min(...grid.map((b) => b[0])), Math.min(...grid.map((b) => b[1])),
                          Math.max(...grid.map((b) => b[2])), Math.max(...grid.map((b) => b[3]))];
            const labels = Array.from(plot.querySelectorAll(".label")).map((e) => [e.textContent, box(e)]);
            const points = Array.from(plot.querySelectorAll(".pt")).map((e) => [e.dataset.tip.split("\\n")[0],
                e.classList.contains("ours"), e.getAttribute(e.classList.contains("ours") ? "fill" : "stroke"),
                e.getAttribute("d")]);
            return [labels, area, points];""",
        )
    finally:
        driver.quit()
    assert len([p for p in points if p[1]]) == len(crowd()) and any(not p[1] for p in points)
    boxes = [b for _, b in labels]
    assert len(boxes) >= 3 and all(b[2] > b[0] and b[3] > b[1] for b in boxes)
    crossing = [(labels[i][0], labels[j][0]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                if boxes[i][0] < boxes[j][2] and boxes[j][0] < boxes[i][2]
                and boxes[i][1] < boxes[j][3] and boxes[j][1] < boxes[i][3]]  # fmt: skip
    assert crossing == []
    assert all(area[0] - 0.5 <= b[0] and b[2] <= area[2] + 0.5 and area[1] - 0.5 <= b[1] and b[3] <= area[3] + 0.5
               for b in boxes)  # fmt: skip
    colours: dict[str, set[str]] = {}
    look: dict[str, set[tuple[str, str]]] = {}
    for method, _, colour, shape in points:
        colours.setdefault(category(method), set()).add(colour)
        look.setdefault(method, set()).add((colour, shape))
    assert all(len(c) == 1 for c in colours.values()) and len(colours) == len(CATEGORY_STYLE)
    assert all(len(v) == 1 for v in look.values())  # ours and the papers' points of a method alike
    for family in CATEGORY_STYLE:
        pairs = [next(iter(v)) for m, v in look.items() if category(m) == family]
        assert len(set(pairs)) == len(pairs), family


def test_screenshot_takes_the_whole_page_or_its_top(tmp_path, capsys):
    from PIL import Image

    from benchmark.report import screenshot as browser

    if reason := browser.missing():
        pytest.skip(f"browser test skipped: {reason}")
    write_records(tmp_path)
    write_leaderboard(tmp_path)
    page = tmp_path / "leaderboard.html"
    assert browser.main([str(page), str(tmp_path / "whole.png"), "--width", "900"]) == 0
    assert browser.main([str(page), str(tmp_path / "top.png"), "--width", "900", "--height", "400"]) == 0
    whole, top = Image.open(tmp_path / "whole.png"), Image.open(tmp_path / "top.png")
    assert whole.width == top.width == 900 and top.height == 400 < whole.height
    assert browser.main([str(tmp_path / "nothing.html"), str(tmp_path / "no.png")]) == 2
    assert "no page at" in capsys.readouterr().err and not (tmp_path / "no.png").exists()


@pytest.mark.parametrize("option", ["--height", "--width"])
def test_screenshot_refuses_a_size_that_is_not_a_positive_integer(tmp_path, capsys, option):
    from benchmark.report import screenshot as browser

    with pytest.raises(SystemExit) as exit_:
        browser.main([str(tmp_path / "leaderboard.html"), str(tmp_path / "top.png"), option, "0"])
    assert exit_.value.code == 2 and not (tmp_path / "top.png").exists()
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"argument {option}: must be a positive integer, got 0")
