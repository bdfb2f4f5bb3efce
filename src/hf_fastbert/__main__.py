"""`python -m hf_fastbert`: the `hf-fastbert` command line."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
