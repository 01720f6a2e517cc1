"""mkdocs hook: show the reST markup of the docstrings as plain Markdown would.

The docstrings are read by mkdocstrings (Google style), which leaves reST roles and literal-block
markers as text; this drops the role name (``:class:`Codebook``` reads as ``Codebook``) and the
``::`` that introduces a literal block.
"""

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|pep):(?=<code>)")
_LITERAL_ALONE = re.compile(r"<p>::</p>\s*")
_LITERAL_END = re.compile(r"::</p>")


def on_page_content(html, page, config, files):
    html = _ROLE.sub("", html)
    html = _LITERAL_ALONE.sub("", html)
    return _LITERAL_END.sub(":</p>", html)
