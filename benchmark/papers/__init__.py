"""The papers: their reported numbers (`reference`) and their protocols as reproduction plans (`protocols`)."""
