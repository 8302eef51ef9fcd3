"""Answers rendered for the page: Markdown (raw HTML disabled) with Pygments-highlighted code
blocks, then sanitised with nh3 so nothing a model writes can run in the browser."""

import html

import nh3
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

_formatter = HtmlFormatter(nowrap=True)


def _highlight(code, lang, attrs):
    try:
        lexer = get_lexer_by_name(lang) if lang else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes the code itself
    return highlight(code, lexer, _formatter)


_md = MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight}).enable("table")

ALLOWED_TAGS = {
    "p", "br", "hr", "em", "strong", "code", "pre", "span", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "del", "img",
}
ALLOWED_ATTRIBUTES = {"span": {"class"}, "code": {"class"}, "a": {"href", "title"}, "img": {"src", "alt"},
                      "th": {"style"}, "td": {"style"}, "ol": {"start"}}


def render_markdown(text):
    return nh3.clean(_md.render(text or ""), tags=ALLOWED_TAGS, attributes=ALLOWED_ATTRIBUTES,
                     url_schemes={"http", "https", "mailto"}, link_rel="noopener noreferrer nofollow")


def escape_piece(text):
    """A streamed token piece as HTML text (shown as typed until the final render replaces it)."""
    return html.escape(text, quote=True)


def pygments_css():
    return _formatter.get_style_defs(".answer pre")
