"""Models as parameter trees plus pure ``init``/``apply`` functions (no nn.Module)."""
