"""Assemble the self-contained HTML page: static skeleton, inline CSS/JS and the JSON payload."""

from __future__ import annotations

import html
import json

from branchgrpo.report.assets import script, stylesheet

SECTIONS = (
    ("overview", "Overview"),
    ("rewards", "Reward and loss"),
    ("metrics", "Training metrics"),
    ("samples", "Samples"),
    ("cost", "NFE and time"),
    ("trees", "Rollout trees"),
    ("config", "Config"),
)
# No network at all: only inline scripts/styles and data: images may load.
CSP = "default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def embed_json(payload: dict) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(payload: dict) -> str:
    name = html.escape(payload["run"]["name"])
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title in SECTIONS)
    sections = "\n".join(
        f'<section id="{sid}"><h2>{html.escape(title)}</h2><div class="body" id="{sid}-body">'
        f'<p class="empty">This section needs JavaScript.</p></div></section>'
        for sid, title in SECTIONS
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="branchgrpo {html.escape(payload['run']['version'])}">
<title>branchgrpo report · {name}</title>
<style>
{stylesheet()}</style>
</head>
<body>
<header class="top">
<div class="title"><h1>{name}</h1><span class="meta" id="run-meta"></span></div>
<nav>{nav}</nav>
</header>
<main>
{sections}
</main>
<div id="tip" hidden></div>
<div id="lightbox" hidden></div>
<script type="application/json" id="report-data">{embed_json(payload)}</script>
<script>
{script()}</script>
</body>
</html>
"""
