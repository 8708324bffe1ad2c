"""Start the vlm-tools MCP server: ``python server.py [flags]`` is ``vlm-tools serve [flags]``."""

import sys

from vlm_tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
