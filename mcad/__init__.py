"""mcad: distil big image-text teachers into a mobile-sized dual encoder (MCAD).

The code lives in four packages, folders at the top of the repository that
install under this one name (see docs/design.md, "Packages"):
`mcad.storage`, `mcad.student`, `mcad.pipeline` and `mcad.jobs`.
"""
__version__ = "0.1.0"
