"""Datasets for training and evaluating ViQ with an LLM.

* :mod:`viq.data.synthetic`: deterministic synthetic multimodal QA (OCR, counting, location,
  colour, bar charts, documents) written as LLaVA-style JSON lines plus PNG images.
* :mod:`viq.data.photos`: real photographs available offline (scikit-image, scikit-learn,
  matplotlib sample data, Debian wallpaper packages) for reconstruction and evaluation.

Submodules are imported explicitly (``from viq.data import synthetic``); this package init
imports nothing so that importing one dataset never pulls in the dependencies of another.
"""
