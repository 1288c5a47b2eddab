"""The completion engine: context -> prompt -> backend -> postprocess -> cache.

No LSP types live here; everything speaks plain dataclasses.
"""
