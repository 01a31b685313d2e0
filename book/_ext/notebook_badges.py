"""Sphinx extension: put "Open in Colab" and "Open in Kaggle" badges under the title of every chapter.

Jupyter Book 1.x gives no Colab launch link for pages built from MyST markdown, so the badges are
added here, from the repository URL and branch in ``_config.yml`` (the one place that names them).
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


def _add_badges(app, docname, source):
    if not CHAPTER.match(docname):
        return
    options = app.config.html_theme_options
    line = badges(options["repository_url"], options.get("repository_branch", "main"), docname)
    source[0] = TITLE.sub(lambda title: f"{title.group(0)}\n\n{line}\n", source[0], count=1)


def setup(app):
    app.connect("source-read", _add_badges)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
