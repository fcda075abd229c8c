"""Many runs, with the result files as the only state: the protocol's graph of runs executed in this process
(`inline`), in local worker processes or as SLURM job arrays (`driver`, `worker`, `executors`, `launch`), claims
that make every run happen once (`claims`), and whether a stored result stands for a planned run (`resume`)."""
