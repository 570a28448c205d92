"""Experiments that drive the entry scripts: the quickstart demo and the read-out comparison."""
