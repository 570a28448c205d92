"""The networks: ViT backbone, read-outs (plug-ins listed in registry.py), DINO head, student and teacher."""
