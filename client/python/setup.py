"""Build hooks of modeld-client: the gRPC stubs are generated from modeld's protos when
the package is built, never committed.

- `build_py` runs grpc_tools.protoc on modeld/v1/*.proto into the package
  `modeld_client.v1` (into the source tree for an editable install). protoc writes
  `from modeld.v1 import model_pb2`; those imports are rewritten to
  `from modeld_client.v1 import model_pb2`, so the stubs live inside this package and
  never claim a top-level `modeld` package that another copy of the stubs, or some
  other project, may own. The descriptors keep their proto names (modeld/v1/*.proto).
- `sdist` copies the protos into the source distribution (as `proto/`), so a wheel
  builds from it without the repository.
- The runtime floor of grpcio and protobuf is what the generated code checks at import:
  grpcio at least the grpcio-tools that generated it, protobuf at least the version its
  protoc generates for (read from the generated code), below the next major.

The protos are looked for in $MODELD_PROTO_DIR, then `proto/` beside this file (an
sdist), then `../../proto` (this repository).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from importlib.metadata import version
from importlib import resources
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.command.sdist import sdist as _sdist

HERE = Path(__file__).resolve().parent
PACKAGE = "modeld_client"
STUBS = "v1"  # modeld_client.v1
PROTO_PACKAGE = Path("modeld", "v1")


def proto_root() -> Path:
    """The directory holding modeld/v1/*.proto."""
    candidates = []
    if os.environ.get("MODELD_PROTO_DIR"):
        candidates.append(Path(os.environ["MODELD_PROTO_DIR"]))
    candidates += [HERE / "proto", HERE.parent.parent / "proto"]
    for root in candidates:
        if sorted((root / PROTO_PACKAGE).glob("*.proto")):
            return root.resolve()
    raise SystemExit(
        "modeld-client: modeld's protos (modeld/v1/*.proto) are not in "
        + ", ".join(str(c) for c in candidates)
        + "; build from the modeld repository or its sdist, or set MODELD_PROTO_DIR"
    )


def protoc(out: Path, protos: list[str], root: Path, *, grpc: bool) -> None:
    """Runs grpc_tools' protoc with its bundled well-known types on the include path."""
    from grpc_tools import protoc as grpc_protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}"]
    if grpc:
        args.append(f"--grpc_python_out={out}")
    code = grpc_protoc.main(args + protos)
    if code != 0:
        raise SystemExit(f"modeld-client: protoc failed ({code}) on {', '.join(protos)} in {root}")


IMPORT = re.compile(r"^(\s*)from modeld\.v1 import ", re.MULTILINE)


def generate(dest: Path) -> list[Path]:
    """Generates the stubs into `dest` (the `modeld_client/v1` directory)."""
    root = proto_root()
    protos = sorted(p.relative_to(root).as_posix() for p in (root / PROTO_PACKAGE).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        protoc(Path(tmp), protos, root, grpc=True)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        written = []
        for src in sorted((Path(tmp) / PROTO_PACKAGE).iterdir()):
            text = IMPORT.sub(rf"\1from {PACKAGE}.{STUBS} import ", src.read_text(encoding="utf-8"))
            if re.search(r"^\s*(from|import) modeld\b", text, re.MULTILINE):
                raise SystemExit(f"modeld-client: an import of modeld in {src.name} was not rewritten")
            (dest / src.name).write_text(text, encoding="utf-8")
            written.append(dest / src.name)
    init = dest / "__init__.py"
    init.write_text(
        '"""Stubs generated from modeld/v1/*.proto when modeld-client was built."""\n',
        encoding="utf-8",
    )
    return [init] + written


def gencode_requirements() -> list[str]:
    """grpcio and protobuf at least what the stubs this build generates need."""
    tools = version("grpcio-tools")
    root = proto_root()
    with tempfile.TemporaryDirectory() as tmp:
        protoc(Path(tmp), [(PROTO_PACKAGE / "model.proto").as_posix()], root, grpc=False)
        head = (Path(tmp) / PROTO_PACKAGE / "model_pb2.py").read_text(encoding="utf-8")
    found = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)\s*$", head, re.MULTILINE)
    if not found:
        raise SystemExit("modeld-client: the generated code does not say its protobuf version")
    major, minor, patch = (int(g) for g in found.groups())
    return [
        f"grpcio>={tools}",
        f"protobuf>={major}.{minor}.{patch},<{major + 1}",
        "googleapis-common-protos>=1.56",
    ]


class build_py(_build_py):
    """Also generates modeld_client.v1 from the protos."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            dest = HERE / PACKAGE / STUBS
        else:
            dest = Path(self.build_lib) / PACKAGE / STUBS
        self.announce(f"generating {PACKAGE}.{STUBS} from {proto_root()}", level=2)
        self._generated = generate(dest)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return list(super().get_outputs(include_bytecode)) + [str(p) for p in getattr(self, "_generated", [])]


class sdist(_sdist):
    """Ships the protos inside the source distribution."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = proto_root()
        target = Path(base_dir, "proto", PROTO_PACKAGE)
        target.mkdir(parents=True, exist_ok=True)
        for p in sorted((root / PROTO_PACKAGE).glob("*.proto")):
            shutil.copyfile(p, target / p.name)


setup(
    install_requires=gencode_requirements(),
    cmdclass={"build_py": build_py, "sdist": sdist},
)
