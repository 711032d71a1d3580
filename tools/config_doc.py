"""Write docs/config.md, the reference of every config field, from src/mmtag/config.py itself:
each section's dataclass, each field's type and default, and the comment beside it. Run it after
changing a field; a test fails while docs/config.md differs from what it writes.

    python tools/config_doc.py            # rewrite docs/config.md
    python tools/config_doc.py --check    # exit 1 if docs/config.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

from mmtag import config

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config.md"
SECTIONS = [("", config.TrainConfig), ("data", config.DataConfig), ("model", config.ModelConfig),
            ("loss", config.LossConfig), ("optim", config.OptimConfig),
            ("cache", config.CacheConfig)]


def field_comments(source: str, class_name: str) -> dict[str, str]:
    """Each field of `class_name` -> its comment: the `#` text on its line and on the comment
    lines under it indented further (its continuation), else the comment block above it (at
    the field's own indentation)."""
    lines = source.splitlines()
    cls = next(n for n in ast.parse(source).body
               if isinstance(n, ast.ClassDef) and n.name == class_name)
    fields = [n for n in cls.body if isinstance(n, ast.AnnAssign)]
    out = {}
    for i, node in enumerate(fields):
        start = node.lineno - 1
        end = fields[i + 1].lineno - 1 if i + 1 < len(fields) else cls.end_lineno
        parts = [lines[start].partition("#")[2].strip()] if "#" in lines[start] else []
        indent = node.col_offset
        for line in lines[node.end_lineno:end]:
            if not line.strip().startswith("#") or len(line) - len(line.lstrip()) <= indent:
                break
            parts.append(line.strip()[1:].strip())
        if not parts:  # a comment block above the field
            j = start - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                parts.insert(0, lines[j].strip()[1:].strip())
                j -= 1
        out[node.target.id] = " ".join(p for p in parts if p)
    return out


def recipe_keys() -> dict[str, list[str]]:
    """Each dotted key -> the built-in recipes whose YAML sets it."""
    import yaml

    out: dict[str, list[str]] = {}
    for path in sorted(config.RECIPES_DIR.glob("*.yaml"), key=lambda p: p.stem):
        for section, values in yaml.safe_load(path.read_text()).items():
            keys = ([f"{section}.{k}" for k in values] if isinstance(values, dict)
                    else [section])
            for key in keys:
                out.setdefault(key, []).append(path.stem)
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else repr(f.default).replace("'", "")
    value = f.default_factory()  # type: ignore[misc]
    return "(section)" if dataclasses.is_dataclass(value) else repr(value)


def render() -> str:
    source = Path(config.__file__).read_text()
    out = ["# Configuration reference", "",
           "Every field of a run's config (`config.yaml`, `--config FILE`, `--set key=value`), "
           "with its type, default and meaning. Generated from `src/mmtag/config.py` by "
           "`python tools/config_doc.py`: edit the comments there, not this file. The built-in "
           "recipes (`demo`, `report`, `cpu`, `gpu`) are YAML files in `src/mmtag/configs/`; "
           "each line of theirs says why its value is chosen. The column *recipes* names those "
           "that set a key; a key none sets keeps its default there and is for you to turn.", ""]
    used = recipe_keys()
    for section, cls in SECTIONS:
        comments = field_comments(source, cls.__name__)
        doc = " ".join(line.strip() for line in (cls.__doc__ or "").strip().splitlines())
        out += [f"## `{section}`" if section else "## Top level", "", doc, "",
                "| key | type | default | recipes | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory() if f.default_factory
                                        is not dataclasses.MISSING else None):
                continue  # a section: documented under its own heading
            key = f"{section}.{f.name}" if section else f.name
            kind = str(f.type).replace("|", "or")
            meaning = comments.get(f.name, "").replace("|", "or")
            recipes = ", ".join(used.get(key, []))
            out.append(f"| `{key}` | {kind} | `{_default(f)}` | {recipes} | {meaning} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check docs/config.md is current")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/config_doc.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
