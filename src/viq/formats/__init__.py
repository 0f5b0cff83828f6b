"""File formats at the edges of the model: images in (loading, resolution policy, normalisation)
and codes out (:class:`~viq.formats.codes.Codes` and the ``.viq`` file)."""
