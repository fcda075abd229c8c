"""How to run and report: the LightningModule and DataModule, the runner, results and the leaderboard."""
