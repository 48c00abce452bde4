"""The one path by which the report writes HTML: every value goes through markupsafe's escaping unless the
report built it itself (a `Markup`), so a caption, key, head name, token or record value from the data
shows as text whatever it holds. The page carries a Content-Security-Policy that runs no script at all
(the report has none) and loads nothing but its own inline images and its one style sheet."""

from __future__ import annotations

import base64
import hashlib

from markupsafe import Markup, escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
nav a { margin-right: 1rem; } section { margin-top: 2rem; } img { max-width: 100%; }
.grid { display: flex; flex-wrap: wrap; gap: .5rem; } figure { margin: 0; display: inline-block; }
figcaption { font-size: .75rem; max-width: 128px; color: #555; } table.funnel td { padding: .1rem .8rem; }
figure.wide figcaption { max-width: none; } pre { font-size: .75rem; background: #f6f6f6; padding: .5rem; }
"""

# no script, no frames, no requests: only data: images and the style sheet above, by its hash
POLICY = (
    "default-src 'none'; img-src data:; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()}'; "
    "base-uri 'none'; form-action 'none'"
)


def html(template: str, *args, **kwargs) -> Markup:
    """`template` (written here, trusted) with each argument escaped unless it is itself `Markup`."""
    return Markup(template).format(*args, **kwargs)


def concat(parts) -> Markup:
    return Markup("").join(parts)


def as_markup(body) -> Markup:
    """A section's body: what a section built as `Markup` stays; any plain text is escaped."""
    return body if isinstance(body, Markup) else escape(body)


def figure(alt, uri: str, caption) -> Markup:
    return html('<figure><img alt="{}" src="{}"><figcaption>{}</figcaption></figure>', alt, uri, caption)


def image(alt, uri: str) -> Markup:
    return html('<img alt="{}" src="{}">', alt, uri)


def page(title, heading, sections: list[tuple[str, str, object]]) -> str:
    """The whole page: (id, title, body) sections behind a navigation bar."""
    nav = concat(html('<a href="#{}">{}</a>', i, t) for i, t, _ in sections)
    content = concat(
        html('<section id="{}"><h2>{}</h2>{}</section>', i, t, as_markup(b)) for i, t, b in sections
    )
    return str(
        html(
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta http-equiv="Content-Security-Policy" content="{}">'
            "<title>latentmill report: {}</title>\n<style>{}</style></head>\n"
            "<body><h1>latentmill report: {}</h1><nav>{}</nav>{}</body></html>\n",
            Markup(POLICY),
            title,
            Markup(STYLE),
            heading,
            nav,
            content,
        )
    )
