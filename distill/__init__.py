"""distill: selection logs -> an S2T-Local re-ranker for the worker's SLM.

`distill.groups` reads closed selection-log segments into training groups (refusing logs of another
vocabulary or another SLM), `distill.packing` lays a session's groups out as prefix-shared rows, and
`distill.train` trains LoRA + score-bin rows on them, evaluates on held-out groups and exports the adapter
(`s2t distill` runs the three).
"""
