"""The read-out modules; which arch uses which, with its options, is listed in sparo_dino/model/registry.py."""
