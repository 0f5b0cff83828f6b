"""Datasets that feed training: LLaVA conversations (:mod:`~viq.data.llava`), image folders
(:mod:`~viq.data.folder`) and conversations whose images are read from a code store
(:mod:`~viq.data.codes`).

Submodules are imported explicitly; this package init imports nothing so that importing one dataset
never pulls in the dependencies of another.
"""
