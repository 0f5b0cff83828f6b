"""The network: configs, layers, the any-resolution encoder, the FSQ code head, the decoders, the
:class:`~viq.model.viq.ViQModel` facade and the loader for the authors' released files.

Nothing here imports the store, training, demo or CLI code.
"""
