"""``python -m bench``: the suite runner (bench/run.py)."""
import sys

from bench.run import main

sys.exit(main(sys.argv[1:]))
