"""``python -m bench``: the suite runner (bench/run.py), as ``ptcore bench``."""
import sys

from .run import main

sys.exit(main(sys.argv[1:]))
