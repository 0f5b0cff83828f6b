"""Training a ViQ: recipes, the stage table, the stage model, data, optimiser, checkpoints,
parallelism, validation and the loop (:func:`viq.train.engine.train`)."""
