"""CSS and JavaScript of the report page, inlined into the HTML when the page is built.

The sources are package data, ``static/report.css`` and ``static/report.js`` (hand-written, no
libraries, no network), so they can be edited and linted as what they are; the written page
still needs no file but itself.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

STATIC_DIR = "static"
CSS_FILE = "report.css"
JS_FILE = "report.js"
# Inlined text must not close its own element early: the HTML parser ends <style>/<script> at these.
_END_TAGS = {CSS_FILE: "</style", JS_FILE: "</script"}


@lru_cache(maxsize=None)
def read_static(name: str) -> str:
    """The text of ``static/NAME`` in this package, checked to be safe to inline."""
    text = (resources.files(__package__) / STATIC_DIR / name).read_text(encoding="utf-8")
    end_tag = _END_TAGS.get(name)
    if end_tag is not None and end_tag in text.lower():
        raise ValueError(f"{STATIC_DIR}/{name} contains {end_tag!r}, which would end the inline element")
    return text


def stylesheet() -> str:
    """The page's CSS, for an inline ``<style>`` element."""
    return read_static(CSS_FILE)


def script() -> str:
    """The page's JavaScript, for an inline ``<script>`` element."""
    return read_static(JS_FILE)
