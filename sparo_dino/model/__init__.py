"""The networks of a run: student and teacher built from a config (backbones and read-outs: sparo_vit.py)."""
