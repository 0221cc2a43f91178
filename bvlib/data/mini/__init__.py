"""The mini world's data: bundled sources, generated glyphs and patterns, the task registry, the corpus."""
