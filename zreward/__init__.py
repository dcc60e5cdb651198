"""Z-Reward training layer: score vocabulary, VLM scorer, GDSO, RISD, ReFL, metrics, CLI."""
