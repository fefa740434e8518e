"""Sphinx configuration of the scvi-cellplm documentation.

Build (warnings are errors; the tutorials in ``tutorials/`` are executed):

    sphinx-build -M html docs docs/_build -W --keep-going

``CELLPLM_DOCS_EXECUTE=cache`` re-executes only changed tutorials, ``=off`` skips execution.
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
# Build from a checkout without installing: the package and the notebook kernels import from src/.
sys.path.insert(0, str(SRC))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)

import scvi_cellplm  # noqa: E402

# -- Project ------------------------------------------------------------------------------------
project = "scvi-cellplm"
author = "scvi-cellplm developers"
copyright = f"{date.today().year}, {author}"
version = release = scvi_cellplm.__version__
repository_url = "https://github.com/scverse/scvi-cellplm"

# -- General ------------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxcontrib.bibtex",
]
# No intersphinx: the docs build offline.

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_scripts",
    "conf.py",
    "**/__pycache__",
    "**/.ipynb_checkpoints",
    "Thumbs.db",
    ".DS_Store",
]
master_doc = "index"
default_role = "literal"
pygments_style = "default"

# -- Sources: MyST markdown and jupytext percent-format tutorials -------------------------------
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb", ".py": "myst-nb"}
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist", "html_image", "amsmath"]
myst_heading_anchors = 3

nb_execution_mode = os.environ.get("CELLPLM_DOCS_EXECUTE", "force")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True  # tutorials write into a temporary folder, never into the sources
nb_merge_streams = True

# -- Autodoc / autosummary / napoleon ----------------------------------------------------------
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # "Attributes" sections as fields (no duplicate attribute entries)
typehints_defaults = "braces"
always_document_param_types = True
typehints_document_rtype = True

# -- Bibliography -------------------------------------------------------------------------------
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "scvi-cellplm"
html_static_path = ["_static"]
html_show_sphinx = False
html_theme_options = {
    "repository_url": repository_url,
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}


# sphinx-autodoc-typehints 3.6 calls an API that Sphinx 9 deprecates; not a problem of these docs.
warnings.filterwarnings(
    "ignore", message=".*_RstSnippetParser.set_application.*", category=DeprecationWarning
)


def _constant_docstring(app, what, name, obj, options, lines):
    """Give re-exported constants (``scvi_cellplm.PAPER`` ...) the docstring written where they
    are defined (``_presets.py`` ...), instead of the docstring of their type (``dict``, ``str``)."""
    if what != "data":
        return
    from sphinx.pycode import ModuleAnalyzer

    short = name.rsplit(".", 1)[-1]
    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith("scvi_cellplm") or getattr(module, short, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:  # no source: try the next module
            continue
        if ("", short) in docs:
            lines[:] = [line for line in docs[("", short)] if line is not None]
            return
    if obj.__doc__ is not None and obj.__doc__ == type(obj).__doc__:
        lines[:] = []  # never show the docstring of ``dict`` or ``str``


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docstring)
