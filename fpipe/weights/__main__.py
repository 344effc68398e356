"""``python -m fpipe.weights``: see fpipe/weights/cli.py."""
import sys

from fpipe.weights.cli import main

sys.exit(main())
