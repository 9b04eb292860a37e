"""distill: selection logs -> S2T-Local training data.

Implemented: reading closed selection-log segments into training groups (`distill.groups`), refusing logs
written for another vocabulary. Not implemented yet: the S2T-Local trainer (LoRA + reserved score-bin rows)
and the adapter export; see README.md, "What is not done".
"""
