"""twotower: block-diffusion language models built from pretrained NemotronH checkpoints."""

__version__ = "0.1.0"
