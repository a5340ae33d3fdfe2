"""Build the `HpsLookup` TensorFlow op library against the installed TensorFlow (g++, tf.sysconfig flags).

The library lands in a cache directory keyed by TF version and a hash of the source + flags, so a TF upgrade or a
source change rebuilds it and nothing stale is ever loaded:

    $HPS_TF_OP_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/hps/tf_op) / tf<version>-<hash>/libhps_tf_op.so

`library_path()` builds on first use (~10-20 s, under a file lock so concurrent processes build once); `make build`
runs `python -m interop.tf_op.build` so CI compiles (and fails on) it before the tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("hps_lookup_op.cc")
SOURCES = (SOURCE, SOURCE.with_name("embedded_python.h"))  # what the library is built from (its cache key)
LIBRARY_NAME = "libhps_tf_op.so"

__all__ = ["SOURCE", "LIBRARY_NAME", "cache_root", "compiler_command", "library_path", "build"]


def cache_root() -> pathlib.Path:
    """Directory under which the built libraries are kept ($HPS_TF_OP_CACHE, else the user cache)."""
    env = os.environ.get("HPS_TF_OP_CACHE")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "hps" / "tf_op"


def _tf_flags() -> tuple[str, list[str], list[str]]:
    import tensorflow as tf

    compile_flags = list(tf.sysconfig.get_compile_flags())
    include = tf.sysconfig.get_include()
    # DLPack's header ships with TF (the same one TF's own dlpack module is built with).
    compile_flags.append("-I" + os.path.join(include, "external", "dlpack", "include"))
    return tf.__version__, compile_flags, list(tf.sysconfig.get_link_flags())


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def python_flags() -> list[str]:
    """Where the library finds this Python when it must start one (embedded_python.h): its headers, its shared
    library, its executable (so a venv's site-packages are found) and the directory holding `interop`."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        library = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
    else:  # a static Python: there is nothing to load into a process without one (the op says so when asked)
        library = ""
    root = str(pathlib.Path(__file__).resolve().parents[2])
    return ["-I" + sysconfig.get_paths()["include"], "-I" + str(SOURCE.parent),
            "-DHPS_PYTHON_LIBRARY=" + _c_string(library), "-DHPS_PYTHON_EXECUTABLE=" + _c_string(sys.executable),
            "-DHPS_PYTHON_PATH=" + _c_string(root)]


def compiler_command(output: pathlib.Path) -> list[str]:
    """The g++ command line that builds the op library into `output`."""
    _, compile_flags, link_flags = _tf_flags()
    cxx = os.environ.get("CXX", "g++")
    return [cxx, "-shared", "-fPIC", "-O2", "-Wall", "-Wno-sign-compare", str(SOURCE), "-o", str(output),
            *python_flags(), *compile_flags, *link_flags, "-ldl"]


def _build_dir() -> pathlib.Path:
    version, compile_flags, link_flags = _tf_flags()
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update("\0".join(compile_flags + link_flags + python_flags() + [sys.version, sysconfig.get_platform()])
                  .encode())
    return cache_root() / f"tf{version}-{digest.hexdigest()[:12]}"


def build(force: bool = False) -> pathlib.Path:
    """Compile the library unless an up-to-date one exists; returns its path.

    Raises:
        RuntimeError: no C++ compiler, or the compilation failed (the message holds the command and its output).
    """
    directory = _build_dir()
    target = directory / LIBRARY_NAME
    if target.exists() and not force:
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only home (containers): fall back to a per-user temp directory
        fallback = pathlib.Path(tempfile.gettempdir()) / f"hps_tf_op-{os.getuid()}" / directory.name
        log.warning("cannot create %s (%s); building the TF op under %s (set HPS_TF_OP_CACHE to choose)",
                    directory, exc, fallback)
        directory, target = fallback, fallback / LIBRARY_NAME
        if target.exists() and not force:
            return target
        directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library right now
        if target.exists() and not force:
            return target
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise RuntimeError(
                f"building the HpsLookup TensorFlow op needs a C++ compiler: {cxx!r} was not found on PATH "
                "(install g++ or set CXX)"
            )
        tmp = directory / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
        cmd = compiler_command(tmp)
        log.info("building the HpsLookup TF op: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(
                f"building the HpsLookup TensorFlow op failed (exit {proc.returncode}).\ncommand: {' '.join(cmd)}\n"
                f"{proc.stdout}{proc.stderr}"
            )
        os.replace(tmp, target)  # atomic: a reader sees no library or a complete one
        log.info("built %s", target)
    return target


def library_path() -> pathlib.Path:
    """Path of the built library, building it first when missing."""
    return build(force=False)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when an up-to-date library exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build(force=args.force)
    print(path)  # noqa: T201 - the CLI's output is the path
