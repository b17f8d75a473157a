"""llava-edge: export, quantize and run LLaVA vision-language models at the edge."""

__version__ = "0.1.0"
