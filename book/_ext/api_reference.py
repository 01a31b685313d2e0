"""Sphinx extension for the API reference page (``book/api.md``, built by autodoc).

Flax NNX modules are built by a metaclass whose ``__call__`` takes ``(*args, **kwargs)``, and
autodoc shows that instead of the class's own ``__init__``: show ``__init__``'s signature (its
defaults as written in the source, like every other signature on the page). A dataclass without a
docstring is given one by ``dataclasses`` that only repeats its signature: it is left out.
"""

from __future__ import annotations

import dataclasses

from sphinx.ext.autodoc.preserve_defaults import update_defvalue
from sphinx.util.inspect import signature, stringify_signature

HIDDEN = "(*args: Any, **kwargs: Any)"


def _init_signature(app, what, name, obj, options, shown, return_annotation):
    if what != "class" or shown != HIDDEN or "__init__" not in vars(obj):
        return None
    init = obj.__init__
    update_defvalue(app, init, False)
    sig = signature(init, bound_method=True, type_aliases=app.config.autodoc_type_aliases)
    return stringify_signature(sig, show_return_annotation=False, unqualified_typehints=True), None


def _drop_generated_docstring(app, what, name, obj, options, lines):
    """A dataclass without a docstring gets one that repeats its signature: show none instead."""
    if what == "class" and dataclasses.is_dataclass(obj) and "__doc__" in vars(obj):
        if lines and lines[0].startswith(f"{obj.__name__}(") and obj.__doc__.startswith(f"{obj.__name__}("):
            lines.clear()


def setup(app):
    app.connect("autodoc-process-signature", _init_signature)
    app.connect("autodoc-process-docstring", _drop_generated_docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
