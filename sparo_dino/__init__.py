"""DINO self-supervised training with a SPARO read-out: everything behind the top-level entry points."""
