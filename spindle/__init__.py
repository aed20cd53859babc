"""spindle: a distributed long-context training runtime.

The import names ``spindle.runtime``, ``spindle.parallel``, ``spindle.kernels`` and
``spindle.launch`` map onto the top-level folders of the repository (see pyproject.toml).
"""

__version__ = "0.1.0"
