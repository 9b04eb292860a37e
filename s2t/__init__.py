"""s2t: the shared core of Select-to-Think serving.

What every role needs and no role owns: the configuration (`config`), the model store and vocabulary
identity (`model_store`, `vocab`), the engine (`runtime`, `weight_formats`), what the SLM proposes and when
to ask about it (`triggers`, `calibration`), the selection-log schema with its writer and reader
(`selection_log`), and the wire (`s2t.v1`, generated from protos/). The roles — `slm_worker`,
`llm_selector`, `distill` — import only this package, never each other; `s2t.cli` and `s2t.stack` are the
one place that composes them.
"""

import os

# Worker and selector often share one machine's cores. OpenMP threads that spin-wait after each parallel
# region steal those cores from the other process (measured: +15 % per forward when two thread teams
# alternate); passive waiting costs nothing measurable here. It must be set before torch loads OpenMP, and
# every role imports s2t (at least s2t.v1) before torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
