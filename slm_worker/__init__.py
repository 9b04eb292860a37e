"""The SLM worker: drafts with the small model, asks the selector, streams committed text to clients.

Also home of what every part of s2t shares: the configuration, the model store and the model runtime.
"""

import os

# Worker and selector often share one machine's cores. OpenMP threads that spin-wait after each parallel
# region steal those cores from the other process (measured: +15 % per forward when two thread teams
# alternate); passive waiting costs nothing measurable here. Must be set before torch loads OpenMP; a value
# the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
