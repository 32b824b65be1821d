"""Public import path of :mod:`mixgrpo.results.plots`, kept for notebooks and scripts written against it.

The name is bound to that very module (not a copy), so attributes, private helpers and monkeypatches agree.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("mixgrpo.results.plots")
