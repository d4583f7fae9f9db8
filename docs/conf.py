"""Sphinx configuration of the mha_ext API reference (built warning-free: sphinx-build -W).

The reference is generated from the docstrings (NumPy style, napoleon) of the installed
package: `pip install ".[docs]"` in the clone, then `sphinx-build -W docs docs/_build/html`.
"""

import mha_ext

project = "mha_ext"
copyright = "2026, The mha_ext developers"
author = "The mha_ext developers"
release = mha_ext.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_typehints = "none"  # the NumPy-style sections state the types; the signature stays short
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "special-members": "__call__"}
exclude_patterns = ["_build"]
html_theme = "alabaster"
