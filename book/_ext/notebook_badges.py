"""Sphinx extension: check the "Open in Colab" and "Open in Kaggle" badges under every chapter's title.

Jupyter Book 1.x gives no Colab launch link for pages built from MyST markdown, so every chapter's
source (its ``.md``, hence its ``.ipynb``, which Colab and Kaggle open) carries the badges on the line
under its title. This extension adds nothing: it builds the expected line from the repository URL and
branch in ``_config.yml`` (the one place that names them) and warns, which fails a ``-W`` build, when a
chapter's line is missing or different.
"""

from __future__ import annotations

import re

CHAPTER = re.compile(r"^book/\d\d_[\w-]+$")
TITLE = re.compile(r"^# .+$", re.MULTILINE)


def notebook_url(repository_url: str, branch: str, docname: str) -> str:
    """The chapter's committed .ipynb on GitHub."""
    return f"{repository_url.rstrip('/')}/blob/{branch}/{docname}.ipynb"


def badges(repository_url: str, branch: str, docname: str) -> str:
    github = notebook_url(repository_url, branch, docname).removeprefix("https://github.com/")
    colab = f"https://colab.research.google.com/github/{github}"
    kaggle = f"https://kaggle.com/kernels/welcome?src={notebook_url(repository_url, branch, docname)}"
    return (
        f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab}) "
        f"[![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]({kaggle})"
    )


def badges_under_title(source: str, line: str) -> bool:
    """Whether ``line`` is the first non-blank line after the ``# title`` of the MyST ``source``."""
    title = TITLE.search(source)
    return title is not None and source[title.end() :].lstrip("\n").split("\n", 1)[0] == line


def _check_badges(app, docname, source):
    if not CHAPTER.match(docname):
        return
    options = app.config.html_theme_options
    line = badges(options["repository_url"], options.get("repository_branch", "main"), docname)
    if not badges_under_title(source[0], line):
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            f"{docname}: the line under the title must be the badges {line}", location=docname
        )


def setup(app):
    app.connect("source-read", _check_badges)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
