"""The commands of `python -m benchmark`: each module holds its commands' options (`register`) and entry points."""

from benchmark.commands import batch, catalog, data, export, perf, reports, reproduce, synth, train

# In the order `--help` lists them.
COMMAND_MODULES = (catalog, synth, train, reports, reproduce, data, perf, export, batch)
