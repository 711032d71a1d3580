"""Jinja2 rendering of the report and results templates (templates/)."""

from __future__ import annotations

import base64
import math
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


def _num(value, digits: int = 4) -> str:
    """A figure for a table: fixed decimals; '-' for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}"


def _md(text) -> str:
    """User text (a caption, an ID) for Markdown: no HTML gets through, and a | cannot break
    a table row."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|"))


def _data_uri(path: Path | str) -> str:
    """A PNG or JPEG as a data: URI, so that the HTML needs no other file and no network."""
    path = Path(path)
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def environment(html: bool):
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=html, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(num=_num, signed=_signed, data_uri=_data_uri, md=_md)
    return env


def render(template: str, **context) -> str:
    """Render templates/<template>; HTML templates are autoescaped."""
    return environment(template.endswith(".html.j2")).get_template(template).render(**context)
