"""File type detection by content, and text extraction with page numbers.

The name a file arrives with is never trusted: `sniff` looks at the bytes. Every rejection is an
`ExtractionError` whose message is shown to the user as it stands.
"""

import io
import re
from html.parser import HTMLParser

# Bytes that never occur in text: NUL and the C0 controls other than tab, newline, form feed, CR, ESC.
_BINARY_BYTES = set(range(0, 32)) - {9, 10, 12, 13, 27}


# Magic numbers of common binary formats, for a clearer message than "not UTF-8".
_BINARY_MAGIC = (b"\x7fELF", b"\x89PNG", b"GIF8", b"\xff\xd8\xff", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")


class ExtractionError(ValueError):
    pass


def _decode_text(data):
    if b"\x00" in data[:65536] or sum(byte in _BINARY_BYTES for byte in data[:65536]) > 0:
        raise ExtractionError("The file contains binary data (NUL or control bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExtractionError(
            f"The file is not valid UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8 and upload again"
        ) from None
    if not text.strip():
        raise ExtractionError("The file contains no text")
    return text


def _looks_like_html(data):
    head = data[:2048].lstrip().lower()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    return head.startswith((b"<!doctype html", b"<html")) or (
        head.startswith(b"<") and re.search(rb"<(head|body|p|div|h[1-6]|article|section|title)[\s>]", head) is not None
    )


def _looks_like_markdown(text):
    return re.search(r"^(#{1,6} |[-*+] |\d+\. |> |```)", text, re.MULTILINE) is not None


def sniff(data):
    """The content type of `data` (one of EXTRACTORS), or ExtractionError saying why it is refused."""
    if not data:
        raise ExtractionError("The file is empty")
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise ExtractionError("The file is a ZIP archive (or an Office document), not a PDF or text; upload txt, md, html or pdf")
    if data.startswith(_BINARY_MAGIC):
        raise ExtractionError("The file is binary (an image, archive or program), not a document; upload txt, md, html or pdf")
    text = _decode_text(data)
    if _looks_like_html(data):
        return "text/html"
    if _looks_like_markdown(text):
        return "text/markdown"
    return "text/plain"


def _plain_pages(data):
    return [_decode_text(data)]


class _TextOfHtml(HTMLParser):
    """Visible text of an HTML page: script, style and other non-content elements are dropped."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
             "blockquote", "table", "ul", "ol", "hr", "title", "dd", "dt"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)

    def text(self):
        joined = "".join(self.parts)
        lines = [" ".join(line.split()) for line in joined.splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _html_pages(data):
    parser = _TextOfHtml()
    parser.feed(_decode_text(data))
    parser.close()
    text = parser.text()
    if not text:
        raise ExtractionError("The HTML page has no visible text")
    return [text]


def _open_pdf(data):
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise ExtractionError("The PDF is encrypted (password-protected); upload an unencrypted copy")
        count = len(reader.pages)
    except ExtractionError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise ExtractionError(f"The PDF is damaged and cannot be read ({type(exc).__name__}: {exc})") from None
    if count == 0:
        raise ExtractionError("The PDF has no pages")
    return reader


def _pdf_pages(data):
    reader = _open_pdf(data)
    pages = []
    for number, page in enumerate(reader.pages, start=1):
        try:
            pages.append(page.extract_text() or "")
        except Exception as exc:  # pypdf raises many types on broken content streams
            raise ExtractionError(f"Page {number} of the PDF cannot be read ({type(exc).__name__}: {exc})") from None
    if not any(text.strip() for text in pages):
        raise ExtractionError("The PDF has no extractable text (is it a scanned image?)")
    return pages


# Content type → function(bytes) → list of page texts (page 1 first).
EXTRACTORS = {
    "text/plain": _plain_pages,
    "text/markdown": _plain_pages,
    "text/html": _html_pages,
    "application/pdf": _pdf_pages,
}


def check(data):
    """Validates an upload before it is stored: returns the content type; cheap for PDFs (opens the
    file and counts pages, the text is read at ingestion)."""
    content_type = sniff(data)
    if content_type == "application/pdf":
        _open_pdf(data)
    else:
        EXTRACTORS[content_type](data)
    return content_type


def extract_pages(data, content_type):
    return EXTRACTORS[content_type](data)
