"""Command-line interface (``eetq-lora``)."""
