"""One ml-collections file per experiment; each module docstring is its launch command."""
