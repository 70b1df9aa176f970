"""Generates the Python stubs for the protos in this folder.

The stubs are committed so that an editable install needs no build step;
`tests/test_protos.py` regenerates them into a temporary folder and fails when
they differ, so they cannot drift from the .proto files.

    python -m moecluster.protos.generate            # rewrite the stubs here
    python -m moecluster.protos.generate --out DIR  # write them elsewhere
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = sorted(p.name for p in HERE.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Compiles every .proto here; returns the generated files written to `out_dir`.

    Protos are compiled from a copy laid out as `moecluster/protos/*.proto`, so the
    generated imports read `from moecluster.protos import tensor_pb2`.
    """
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "moecluster" / "protos"
        src.mkdir(parents=True)
        for name in PROTOS:
            shutil.copy(HERE / name, src / name)
        include = str(Path(protoc.__file__).parent / "_proto")
        args = ["protoc", f"-I{tmp}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [f"moecluster/protos/{name}" for name in PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        written = []
        for generated in sorted(src.glob("*_pb2*.py")):
            target = out_dir / generated.name
            shutil.copy(generated, target)
            written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the stubs (default: next to the protos)")
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
