"""NL-to-code data: the one record type, the loaders of the built-in data sets and user files,
and the splits a run reads."""
