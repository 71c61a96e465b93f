"""corsa: knowledge editing with CoRSA-trained LoRA adapters."""

__version__ = "0.1.0"
