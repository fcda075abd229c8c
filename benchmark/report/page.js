// Interactivity of leaderboard.html (inlined by benchmark/report/html.py): sorting by a column header (by an
// average: complete rows first, as the server orders them), the text and protocol filters, the plot's tooltips
// and the reported rows' toggle. The page reads without it.
"use strict";
(function () {
  const tables = Array.from(document.querySelectorAll("table.board"));
  const filter = document.getElementById("filter");
  const protocol = document.getElementById("protocol-filter");
  const showReported = document.getElementById("show-reported");
  const tooltip = document.getElementById("tooltip");
  const plot = document.getElementById("plot");
  document.getElementById("controls").hidden = false;

  // A cell's sort key: its data-v number, else its text; empty cells sort last in both directions.
  function key(cell) {
    if (!cell) return null;
    if (cell.dataset.v !== undefined) return Number(cell.dataset.v);
    const text = cell.textContent.trim();
    return text === "" || text === "—" ? null : text.toLowerCase();
  }

  function sortBy(table, th) {
    const column = Array.from(th.parentNode.children).indexOf(th);
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const numeric = rows.some((row) => row.cells[column] && row.cells[column].dataset.v !== undefined);
    // First click: best first for numbers (descending), alphabetical for text; then alternate.
    const current = th.getAttribute("aria-sort");
    const descending = current ? current === "ascending" : numeric;
    for (const other of th.parentNode.children) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    const sign = descending ? -1 : 1;
    // An average over fewer tasks is not comparable with a complete row's: complete rows stay first.
    const completeFirst = th.hasAttribute("data-complete-first");
    rows.sort((a, b) => {
      if (completeFirst && a.dataset.complete !== b.dataset.complete) return a.dataset.complete === "1" ? -1 : 1;
      const x = key(a.cells[column]);
      const y = key(b.cells[column]);
      if (x === null || y === null) return (x === null) - (y === null);
      return x < y ? -sign : x > y ? sign : 0;
    });
    for (const row of rows) body.appendChild(row);
  }

  for (const table of tables) {
    table.classList.add("sortable");
    for (const th of table.tHead.rows[0].cells) {
      th.tabIndex = 0; // sortable from the keyboard too
      th.addEventListener("click", () => sortBy(table, th));
      th.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          sortBy(table, th);
        }
      });
    }
  }

  // A row is shown when it matches the text filter and the protocol, and is not a hidden reported row.
  function apply() {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    const wanted = protocol.value;
    const reported = !showReported || showReported.checked;
    const visible = new Set();
    const seen = new Set();
    // Every board's rows (one key per row of a board, shared by its tables and its plot's points).
    for (const row of tables.flatMap((table) => Array.from(table.tBodies[0].rows))) {
      if (!row.dataset.key || seen.has(row.dataset.key)) continue;
      seen.add(row.dataset.key);
      const ok = words.every((w) => row.dataset.search.includes(w)) &&
        (!wanted || row.dataset.protocol === wanted) && (reported || !row.classList.contains("reported"));
      if (ok) visible.add(row.dataset.key);
    }
    for (const element of document.querySelectorAll("[data-key]")) {
      element.toggleAttribute("hidden", !visible.has(element.dataset.key)); // also on SVG elements
    }
    document.getElementById("shown").textContent = `${visible.size} of ${seen.size} rows shown`;
  }
  filter.addEventListener("input", apply);
  protocol.addEventListener("change", apply);
  if (showReported) showReported.addEventListener("change", apply);
  apply();

  // Tooltips: the point's data-tip beside the pointer (its <title> is the fallback without this script).
  if (plot) {
    for (const title of plot.querySelectorAll(".pt > title")) title.remove();
    const figure = plot.parentNode;
    for (const point of plot.querySelectorAll(".pt")) {
      point.addEventListener("mouseenter", () => {
        tooltip.textContent = point.dataset.tip;
        tooltip.hidden = false;
        const box = figure.getBoundingClientRect();
        const dot = point.getBoundingClientRect();
        const x = dot.right - box.left + 8;
        tooltip.style.left = `${Math.min(x, box.width - tooltip.offsetWidth - 4)}px`;
        tooltip.style.top = `${dot.bottom - box.top + 6}px`;
        for (const row of document.querySelectorAll(`tr[data-key="${point.dataset.key}"]`)) row.classList.add("hover");
      });
      point.addEventListener("mouseleave", () => {
        tooltip.hidden = true;
        for (const row of document.querySelectorAll("tr.hover")) row.classList.remove("hover");
      });
    }
  }
})();
