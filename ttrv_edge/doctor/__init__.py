"""``ttrv-edge doctor MODEL``: load a model folder without adapting it and say what ttrv-edge makes of it.

``checks`` (``diagnose``: the report as a JSON-able dict) and ``command`` (the CLI command: a table or ``--json``,
registered on the main app by ``ttrv_edge.cli``). Importing the package imports neither torch nor transformers.
"""

from .checks import PROBE_SIZES, diagnose
from .command import register, rows

__all__ = ["PROBE_SIZES", "diagnose", "register", "rows"]
