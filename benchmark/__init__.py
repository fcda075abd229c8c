"""How to run and report: the LightningModule and DataModule, the runner, results and the leaderboard; the command
line (`benchmark.cli`, the `peft-bench` program) and the Python API over it (`benchmark.api`)."""
