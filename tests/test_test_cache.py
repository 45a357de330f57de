"""The suite writes its caches (converted models, draft GGUFs, profiles) into a temporary
folder, not the user's ``~/.cache/knapspec``, unless ``KNAPSPEC_TEST_CACHE_DIR`` opts in to a
kept one (``tests/conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from knapspec._io import cache_dir

HERE = Path(__file__).resolve()
PROBE_ENV = "KNAPSPEC_TEST_CACHE_PROBE"  # a file the probe test writes the cache path to


def _under(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def test_cache_in_use_is_the_test_cache():
    used = cache_dir()
    opted_in = os.environ.get("KNAPSPEC_TEST_CACHE_DIR")
    if opted_in:
        assert used.resolve() == Path(opted_in).expanduser().resolve()
    else:
        assert not _under(used, Path.home() / ".cache"), used
        assert used.name.startswith("knapspec-test-cache-"), used
        assert used.parent.resolve() == Path(tempfile.gettempdir()).resolve(), used
    assert used.is_dir()
    probe = os.environ.get(PROBE_ENV)
    if probe:
        Path(probe).write_text(str(used), encoding="utf-8")


def test_subprocesses_use_the_test_cache():
    out = subprocess.run(
        [sys.executable, "-c", "from knapspec._io import cache_dir; print(cache_dir())"],
        capture_output=True, text=True, timeout=120, check=True)
    assert Path(out.stdout.strip()) == cache_dir()


def _inner_session(tmp_path: Path, **env: str) -> Path:
    """Run the probe test in a fresh pytest session; return the cache folder it saw."""
    probe = tmp_path / "probe.txt"
    environ = {k: v for k, v in os.environ.items()
               if k not in ("KNAPSPEC_CACHE_DIR", "KNAPSPEC_TEST_CACHE_DIR")}
    environ.update(env, **{PROBE_ENV: str(probe)})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{HERE}::test_cache_in_use_is_the_test_cache"],
        capture_output=True, text=True, timeout=300, env=environ, cwd=HERE.parents[1])
    assert out.returncode == 0, out.stdout + out.stderr
    return Path(probe.read_text(encoding="utf-8"))


def test_temporary_cache_is_removed_and_an_opted_in_one_is_kept(tmp_path):
    seen = _inner_session(tmp_path)
    assert seen.name.startswith("knapspec-test-cache-")
    assert not seen.exists()  # removed when the session ended
    kept = tmp_path / "kept-cache"
    seen = _inner_session(tmp_path, KNAPSPEC_TEST_CACHE_DIR=str(kept))
    assert seen == kept.resolve() and kept.is_dir()
