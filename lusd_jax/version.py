"""The package version, alone in a module so that any layer can import it (the package root imports the pipeline).

pyproject.toml reads it from here (`[tool.setuptools.dynamic]`), so there is one place to change it.
"""

__version__ = "0.1.0"
