"""Where a sweep's runs execute: in this process (`inline`, `benchmark.sweep`), in worker processes on this
machine (`local`) or as SLURM job arrays (`slurm`), both through submitit.

- `options`: the command-line options and their checks.
- `driver`: the protocol as a graph of runs, submitted wave by wave; waiting, retries, progress.
- `worker`: what a submitted job does: runs through the sweep's own claim-protected path.
- `executors`: submitit's executors, and whether SLURM is reachable.
- `waves`: the waves a reproduction plan runs in (`reproduce --plan`).
"""
