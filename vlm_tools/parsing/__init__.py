"""Pure parsers: a model family's raw text → normalised geometry and clean text.

One module per family convention (PaliGemma bins, Molmo percent, Molmo2 0–1000); each turns coordinates into
normalised values through :func:`vlm_tools.geometry.from_scale` and nowhere else. Parsers never raise on
model output (garbage gives an empty result) and raise ``TypeError`` only for a non-``str`` argument.
"""
