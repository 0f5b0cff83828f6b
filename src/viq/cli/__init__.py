"""The ``viq`` command line: a parser and one module per command group."""
