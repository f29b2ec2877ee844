"""Carry the Python packages that benchmarks/gpu_model.py needs to a GPU machine that cannot download.

``build`` (here, with PyPI): downloads wheels into ``.gpu_bundle/`` (git-ignored), for CPython 3.11 to
3.13 on x86_64 Linux, and writes ``manifest.json`` (each distribution's version and requirements):

    python benchmarks/gpu_bundle.py build

The roots are pinned to the versions this project is tested with (transformers, peft, accelerate)
plus the peers gpu_model.py compares against (torchao, bitsandbytes); their dependencies are
followed and pinned to the versions installed here when those fit. torch, triton and numpy are
left out: the GPU machine has them. bitsandbytes' wheel is trimmed to its CPU and CUDA 13
libraries (the GPU machine's torch is a CUDA 13 build), which takes it from 43 MB to a few.

``install`` (on the GPU machine, offline): installs into ``--target`` only what the machine lacks
or has in a version that does not satisfy the roots' requirements, with ``pip install --no-index
--no-deps``, so that ``PYTHONPATH=TARGET`` puts exactly those first and the machine's own copies
serve the rest:

    python3 benchmarks/gpu_bundle.py install --target /tmp/deps

``--all`` installs every bundled distribution whatever the machine has (to test the bundle).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / ".gpu_bundle"
MANIFEST = "manifest.json"
TARGET_MARKER = ".gpu_bundle_target"
# transformers 5.24 needs Python 3.11 or later.
PYTHONS = ("3.11", "3.12", "3.13")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
ROOTS = ("transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0")
# Peers: their absence is reported by gpu_model.py, not an install failure.
OPTIONAL_ROOTS = ("torchao==0.18.0", "bitsandbytes==0.50.2")
# Never bundled: the GPU machine has them (torch and its CUDA libraries), or they are too large to
# carry for four Pythons and every machine with torch has them (numpy), or only a CLI imports them.
EXCLUDED = {
    "torch": "the GPU machine's own",
    "triton": "the GPU machine's own",
    "numpy": "about 16 MB per Python version; the GPU image has it",
    "typer": "imported only by transformers' command line",
}
EXCLUDED_PREFIXES = ("nvidia-",)
MAX_BUNDLE_BYTES = 60 * 2**20
# bitsandbytes ships one library per CUDA/ROCm version; only these are kept.
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")


def canonical(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    """The ``packaging`` module: the interpreter's, else the bundled wheel's (pure Python, importable from the zip)."""
    try:
        import packaging.markers
        import packaging.requirements
        import packaging.specifiers  # noqa: F401
    except ImportError:
        wheels = sorted(BUNDLE.glob("packaging-*.whl"))
        if not wheels:
            raise SystemExit(
                "gpu_bundle: needs the 'packaging' module, and the bundle has no packaging wheel"
            ) from None
        sys.path.insert(0, str(wheels[-1]))
        import packaging.markers
        import packaging.requirements
        import packaging.specifiers  # noqa: F401
    return packaging


def _marker_environments() -> list[dict[str, str]]:
    return [
        {
            "python_version": version,
            "python_full_version": version + ".0",
            "platform_machine": "x86_64",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "os_name": "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "extra": "",
        }
        for version in PYTHONS
    ]


def _wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines without extras) read from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        path = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = archive.read(path).decode("utf-8")
    headers = text.split("\n\n", 1)[0].splitlines()
    fields = [line.split(": ", 1) for line in headers if ": " in line]
    name = next(value for key, value in fields if key == "Name")
    version = next(value for key, value in fields if key == "Version")
    requires = [value for key, value in fields if key == "Requires-Dist" and "extra ==" not in value]
    return name, version, requires


def _download(specs: list[str], folder: Path) -> None:
    for python in PYTHONS:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-qq"]
        command += ["--disable-pip-version-check", "--python-version", python, "--implementation", "cp"]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        subprocess.run(command + ["--dest", str(folder), *specs], check=True)


def _local_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _trim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the bitsandbytes wheel without the libraries for other CUDA and ROCm versions."""
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        dropped = set()
        for info in source.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and not BNB_KEEP.search(base):
                dropped.add(info.filename)
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode("utf-8").splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode("utf-8")
            target.writestr(info, data)
    os.replace(trimmed, wheel)


def build(out: Path) -> int:
    """Download the closure of ROOTS and OPTIONAL_ROOTS into ``out`` (replaced whole) and write its manifest."""
    pkg = _packaging()
    Requirement = pkg.requirements.Requirement
    environments = _marker_environments()
    staging = Path(tempfile.mkdtemp(prefix=".gpu_bundle.", dir=out.parent))
    try:
        dists: dict[str, dict] = {}
        pending = [Requirement(spec) for spec in ROOTS + OPTIONAL_ROOTS + ("packaging",)]
        while pending:
            wanted: dict[str, str] = {}
            for requirement in pending:
                name = canonical(requirement.name)
                if name in EXCLUDED or name.startswith(EXCLUDED_PREFIXES):
                    continue
                if name in dists:
                    version = dists[name]["version"]
                    if not requirement.specifier.contains(version, prereleases=True):
                        raise SystemExit(f"gpu_bundle: {requirement} conflicts with the bundled {name} {version}")
                    continue
                local = _local_version(name)
                # The version this machine runs the dry run with, where it fits: that is what was tested.
                if local is not None and requirement.specifier.contains(local, prereleases=True):
                    wanted[name] = f"{name}=={local}"
                elif name not in wanted:
                    wanted[name] = str(requirement.name) + str(requirement.specifier)
            if not wanted:
                break
            before = set(staging.glob("*.whl"))
            _download(sorted(wanted.values()), staging)
            pending = []
            for wheel in sorted(set(staging.glob("*.whl")) - before):
                name, version, requires = _wheel_metadata(wheel)
                key = canonical(name)
                entry = dists.setdefault(key, {"name": name, "version": version, "requires": requires, "wheels": []})
                entry["wheels"].append(wheel.name)
                for line in requires:
                    requirement = Requirement(line)
                    if requirement.marker is None or any(requirement.marker.evaluate(e) for e in environments):
                        pending.append(requirement)
        for wheel in staging.glob("bitsandbytes-*.whl"):
            _trim_bitsandbytes(wheel)
        total = sum(path.stat().st_size for path in staging.glob("*.whl"))
        manifest = {
            "pythons": list(PYTHONS),
            "roots": list(ROOTS),
            "optional_roots": list(OPTIONAL_ROOTS),
            "excluded": EXCLUDED,
            "dists": dict(sorted(dists.items())),
            "bytes": total,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if total > MAX_BUNDLE_BYTES:
            raise SystemExit(
                f"gpu_bundle: {total / 2**20:.1f} MiB of wheels, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB limit"
            )
        if out.exists():
            if not (out / MANIFEST).exists():
                raise SystemExit(f"gpu_bundle: {out} exists and is not a bundle; remove it or choose another --out")
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for key, entry in manifest["dists"].items():
        print(f"{key:24} {entry['version']:12} {len(entry['wheels'])} wheel(s)")
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")
    return 0


def plan(manifest: dict, installed, include_all: bool) -> tuple[dict[str, str], list[str], list[str]]:
    """Which bundled distributions to install: ``{name: version}``, fatal problems, and notes.

    A requirement the machine's own copy satisfies is left to it (``installed(name)`` gives that
    copy's version or None); otherwise the bundled version is chosen and its own requirements
    are followed. ``include_all`` chooses every bundled distribution instead.
    """
    pkg = _packaging()
    Requirement = pkg.requirements.Requirement
    dists = manifest["dists"]
    chosen: dict[str, str] = {}
    problems: list[str] = []
    notes: list[str] = []
    if include_all:
        chosen = {name: entry["version"] for name, entry in dists.items()}
    queue = [(Requirement(spec), False) for spec in manifest["roots"]]
    queue += [(Requirement(spec), True) for spec in manifest["optional_roots"]]
    followed: set[str] = set()
    seen: list[tuple] = []
    while queue:
        requirement, optional = queue.pop(0)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonical(requirement.name)
        seen.append((requirement, optional))
        if name not in chosen:
            have = installed(name)
            if have is not None and requirement.specifier.contains(have, prereleases=True):
                continue
            entry = dists.get(name)
            if entry is None or not requirement.specifier.contains(entry["version"], prereleases=True):
                why = EXCLUDED.get(name, "not bundled") if entry is None else f"bundle has {entry['version']}"
                message = f"{requirement}: this machine has {have or 'none'}, {why}"
                (notes if optional or name in EXCLUDED else problems).append(message)
                continue
            chosen[name] = entry["version"]
        if name not in followed:
            followed.add(name)
            queue += [(Requirement(line), optional) for line in dists[name]["requires"]]
    # A distribution chosen for one requirement must still satisfy every other one.
    for requirement, optional in seen:
        name = canonical(requirement.name)
        version = chosen.get(name) or installed(name)
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            (notes if optional else problems).append(f"{requirement}: would get {name} {version}")
    return chosen, list(dict.fromkeys(problems)), list(dict.fromkeys(notes))


def install(bundle: Path, target: Path, include_all: bool) -> int:
    """Install into ``target`` what this machine lacks; returns a process exit code."""
    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        print(f"gpu_bundle: no {MANIFEST} in {bundle}; build the bundle first (python benchmarks/gpu_bundle.py build)")
        return 2
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    chosen, problems, notes = plan(manifest, _local_version, include_all)
    for note in notes:
        print(f"gpu_bundle: note: {note}")
    if problems:
        for problem in problems:
            print(f"gpu_bundle: cannot satisfy {problem}")
        return 1
    if target.exists() and any(target.iterdir()):
        if not (target / TARGET_MARKER).exists():
            print(f"gpu_bundle: {target} is not empty and was not made by this script; choose another --target")
            return 2
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / TARGET_MARKER).write_text("made by benchmarks/gpu_bundle.py install\n", encoding="utf-8")
    if chosen:
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet"]
        command += ["--disable-pip-version-check", "--find-links", str(bundle), "--target", str(target)]
        environment = dict(os.environ, PIP_ROOT_USER_ACTION="ignore")
        specs = [f"{name}=={version}" for name, version in sorted(chosen.items())]
        failed = []
        if subprocess.run(command + specs, env=environment).returncode:
            # One at a time, so that a wheel missing for this Python costs only that distribution.
            failed = [
                spec for spec in specs if subprocess.run(command + ["--upgrade", spec], env=environment).returncode
            ]
        required = {canonical(spec.split("==")[0]) for spec in manifest["roots"]}
        if failed:
            print(f"gpu_bundle: pip could not install {', '.join(failed)} for this Python")
            if {canonical(spec.split("==")[0]) for spec in failed} & required:
                return 1
    installed = ", ".join(f"{name} {version}" for name, version in sorted(chosen.items())) or "nothing"
    print(f"gpu_bundle: installed into {target}: {installed}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="download the wheels (needs PyPI)")
    build_parser.add_argument("--out", type=Path, default=BUNDLE)
    install_parser = sub.add_parser("install", help="install what this machine lacks, offline")
    install_parser.add_argument("--bundle", type=Path, default=BUNDLE)
    install_parser.add_argument("--target", type=Path, required=True)
    install_parser.add_argument("--all", action="store_true", help="install every bundled distribution")
    args = parser.parse_args()
    if args.command == "build":
        return build(args.out.resolve())
    return install(args.bundle.resolve(), args.target.resolve(), args.all)


if __name__ == "__main__":
    sys.exit(main())
