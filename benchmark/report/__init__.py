"""Tables and pictures from result files: the leaderboard (Markdown, CSV, PNG, HTML), the comparison with the
papers' tables, and the page's screenshot."""
