"""vlm-tools: an MCP server that gives agents eyes they can act on.

Importing this package loads neither torch nor transformers: they load when a local backend loads.
"""

__version__ = "0.1.0"
