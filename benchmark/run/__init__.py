"""One run: the backbone (`backbone`), the Lightning module (`module`), the run itself (`runner`), its result
record (`results`), and the demo backbone's pretraining (`demo`)."""
