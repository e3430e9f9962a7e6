"""The README documents the output schema and the quick start the CI relies on."""

import re
from pathlib import Path

from vreason_batch.io.schema import OUTPUT_SCHEMA, SCHEMA_VERSION

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_output_column_is_documented_with_its_type():
    section = README.split("## Output schema", 1)[1].split("\n## ", 1)[0]
    assert f"(version {SCHEMA_VERSION})" in README
    documented = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)`(?: / `([^`]+)`)? \| ([^|]+) \|", line)
        if m:
            for name in filter(None, m.group(1, 2)):
                documented[name] = m.group(3).strip()
    missing = [f.name for f in OUTPUT_SCHEMA if f.name not in documented]
    assert not missing, f"columns not in the README schema table: {missing}"
    extra = set(documented) - set(OUTPUT_SCHEMA.names)
    assert not extra, f"README documents columns that do not exist: {extra}"
    short = {"int16": "int16", "int32": "int32", "int8": "int8", "float": "float32", "double": "float64",
             "string": "string", "bool": "bool"}
    for f in OUTPUT_SCHEMA:
        t = str(f.type)
        for k, v in short.items():
            t = re.sub(rf"\b{k}\b", v, t)
        t = t.replace("list<item: ", "list<").replace("timestamp[us, tz=UTC]", "timestamp[us, UTC]")
        assert documented[f.name] == t, (f.name, documented[f.name], t)


def test_quick_start_is_make_demo_and_make_test():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in quick and "make test" in quick
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
