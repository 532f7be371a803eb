"""torsion: layer-resolved activation-steering research on Hugging Face causal LMs."""

__version__ = "0.1.0"
