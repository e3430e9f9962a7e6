"""vreason-batch: distributed batch video QA with V-Reason decoding on Ray Data.

No side effects at import: heavy dependencies (torch, transformers, ray, decord) are imported
inside the functions that need them.
"""

__version__ = "0.1.0"
