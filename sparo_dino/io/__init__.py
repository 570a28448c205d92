"""Files a run reads and writes: checkpoints, weights users name, provenance of an output directory."""
