"""Speed and memory, measured side by side: training step and evaluation per method (`model`, `timing`,
`report`), the predicted cost of a sweep (`estimate`), the data loader (`loader`), local workers (`scaleout`)."""
