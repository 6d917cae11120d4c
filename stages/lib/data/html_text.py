"""HTML to text: the visible prose of a page, one line per block element, each h1-h3 section a document."""

from __future__ import annotations

import re
from html.parser import HTMLParser


class HtmlToText(HTMLParser):
    """Visible prose of an HTML page: one line per block element, a blank line (a new
    document) before every h1-h3 heading, entities decoded. Page furniture is dropped:
    the <head> (its <title> repeats the first heading), scripts and styles, and navigation
    and tables of contents (<nav>, or a class / id / role such as "toc", "navheader",
    "list-of-tables"), because a model trained on them learns to babble section numbers."""

    BLOCKS = {"p", "div", "li", "pre", "tr", "br", "dt", "dd", "table", "blockquote", "h4", "h5", "h6"}
    SECTIONS = {"h1", "h2", "h3"}
    HIDDEN_TAGS = {"head", "script", "style", "noscript", "template", "nav"}
    # DocBook, Sphinx and most site generators mark their furniture with these names.
    FURNITURE = re.compile(r"toc|toctree\S*|nav|navbar|navheader|navfooter|navigation|breadcrumbs?|menu|sidebar"
                           r"|list-of-(tables|figures|examples|equations|procedures)")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.line: list[str] = []
        self.hidden_tag = None  # the element being skipped, and how deep inside nested copies of it we are
        self.hidden_depth = 0
        self.preformatted = 0  # inside <pre>, line breaks are kept

    def is_furniture(self, tag, attrs) -> bool:
        if tag in self.HIDDEN_TAGS:
            return True
        names = " ".join(value or "" for key, value in attrs if key in ("class", "id", "role")).lower().split()
        return any(self.FURNITURE.fullmatch(name) for name in names)

    def end_line(self):
        text = " ".join("".join(self.line).split())
        if text:
            self.sections[-1].append(text)
        self.line = []

    def handle_starttag(self, tag, attrs):
        if self.hidden_tag:
            if tag == self.hidden_tag:
                self.hidden_depth += 1
            elif self.hidden_tag == "head" and tag == "body":  # a page that never closes its <head>
                self.hidden_tag, self.hidden_depth = None, 0
            return
        if self.is_furniture(tag, attrs):
            self.end_line()
            self.hidden_tag, self.hidden_depth = tag, 1
        elif tag in self.SECTIONS:
            self.end_line()
            if self.sections[-1]:
                self.sections.append([])
        elif tag in self.BLOCKS:
            self.end_line()
            self.preformatted += tag == "pre"

    def handle_endtag(self, tag):
        if self.hidden_tag:
            if tag == self.hidden_tag:
                self.hidden_depth -= 1
                if self.hidden_depth == 0:
                    self.hidden_tag = None
            return
        if tag in self.BLOCKS or tag in self.SECTIONS:
            self.end_line()
            if tag == "pre":
                self.preformatted = max(0, self.preformatted - 1)

    def handle_data(self, data):
        if self.hidden_tag:
            return
        if not self.preformatted:
            self.line.append(data)
            return
        first, *rest = data.split("\n")
        self.line.append(first)
        for line in rest:
            self.end_line()
            self.line.append(line)

    def text(self) -> str:
        self.end_line()
        return "\n\n".join("\n".join(lines) for lines in self.sections if lines)


def html_to_text(html: str) -> str:
    parser = HtmlToText()
    parser.feed(html)
    parser.close()
    return parser.text()
