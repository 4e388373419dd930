"""Results files of the book's experiments: provenance, schema checks, and resuming an interrupted run.

A results file is one JSON object::

    {"schema": 1, "experiment": NAME, "provenance": {...},
     "settings": {...}, "runs": [...], ...}

``provenance`` says how the file was made (command, git commit, versions, CPU or GPU, threads, date, wall
time); ``settings`` is everything that determines the numbers (model, training, seeds, arms), so that the
same command at the same commit with the same thread count writes the same numbers again (all but the
times). A notebook loads a file with :func:`load`, which refuses a file that is not what the notebook
expects and says which file and what is wrong, rather than plotting stale data.

While an experiment runs, each finished unit of work is appended to ``<out>.partial.jsonl``; a rerun of
the same command skips what is there (:class:`Partial`), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import torch

SCHEMA = 1
"""The version of the results-file layout; :func:`load` refuses any other."""

PROVENANCE_KEYS = ("command", "git_commit", "torch", "python", "cpu", "threads", "date", "device",
                   "device_name", "wall_seconds")
"""What every results file's ``provenance`` must say."""


class ResultsError(ValueError):
    """A results file that is missing, corrupt, or not the one the caller expects."""


def git_commit() -> str | None:
    """The checkout's commit, with ``+uncommitted changes`` if the package's tracked files (``moe_ref/``,
    the code that computes the numbers) differ from it; ``None`` outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "moe_ref"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+uncommitted changes" if dirty else "")


def device_name(device: str) -> str:
    """The accelerator's name for a CUDA ``device``, else the CPU's model name."""
    from ..book.bench import environment

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return environment()["cpu"]


def provenance(command: str, seconds: float, device: str, commit: str | None = None) -> dict:
    """Where and how a results file was made: ``command``, the commit (``commit``, read when the run
    started, else now), the benchmarks' environment record (:func:`moe_ref.book.bench.environment`:
    versions, CPU, threads, load average, date), the device and its name, and the wall time."""
    from ..book.bench import environment

    commit = git_commit() if commit is None else commit
    return {"command": command, "git_commit": commit, **environment(), "device": device,
            "device_name": device_name(device), "wall_seconds": round(seconds, 1)}


def dumps(result: dict) -> str:
    """``result`` as indented JSON whose innermost lists of numbers stay on one line."""
    text = json.dumps(result, indent=1)
    return re.sub(r"\[\s+([-+.\deE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  text) + "\n"


def fingerprint(settings: dict) -> str:
    """A short hash of ``settings`` without its ``seeds`` (as sorted JSON). Runs are keyed by seed, so two
    settings with the same fingerprint compute the same run for every seed they share."""
    seedless = {key: value for key, value in settings.items() if key != "seeds"}
    return hashlib.sha256(json.dumps(seedless, sort_keys=True).encode()).hexdigest()[:16]


def _differences(found, expected, prefix: str = "") -> list[str]:
    """Dotted paths where ``found`` differs from ``expected`` (only the keys ``expected`` has)."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for key, value in expected.items():
            path = f"{prefix}{key}"
            if key not in found:
                out.append(f"{path} (missing)")
            else:
                out += _differences(found[key], value, path + ".")
        return out
    if isinstance(expected, float) or isinstance(found, float):
        same = isinstance(found, (int, float)) and abs(found - expected) <= 1e-12 * max(1.0, abs(expected))
    else:
        same = found == expected
    return [] if same else [f"{prefix.rstrip('.')}: file has {found!r}, expected {expected!r}"]


def validate(result, path, experiment: str, run_keys: tuple = ()) -> dict:
    """Check the layout of a loaded results file; raise :class:`ResultsError` naming ``path`` if wrong.

    Checks the top-level keys, the schema version, the experiment name, the provenance keys, that
    ``runs`` is a non-empty list of records that each have ``run_keys``, and that every (arm, seed) of
    ``settings`` has exactly one run.
    """
    def fail(what: str):
        raise ResultsError(f"results file {path}: {what}")

    if not isinstance(result, dict):
        fail(f"expected a JSON object, got {type(result).__name__}")
    missing = [k for k in ("schema", "experiment", "provenance", "settings", "runs") if k not in result]
    if missing:
        fail(f"missing top-level keys {missing}")
    if result["schema"] != SCHEMA:
        fail(f"schema {result['schema']!r}, this code reads schema {SCHEMA}")
    if result["experiment"] != experiment:
        fail(f"holds experiment {result['experiment']!r}, expected {experiment!r}")
    lacking = [k for k in PROVENANCE_KEYS if k not in result["provenance"]]
    if lacking:
        fail(f"provenance lacks {lacking}")
    runs = result["runs"]
    if not isinstance(runs, list) or not runs:
        fail("runs must be a non-empty list")
    for i, run in enumerate(runs):
        absent = [k for k in ("arm", "seed", *run_keys) if not isinstance(run, dict) or k not in run]
        if absent:
            fail(f"run {i} lacks {absent}")
    settings = result["settings"]
    wanted = {(arm, seed) for arm in settings.get("arms", {}) for seed in settings.get("seeds", [])}
    have = [(run["arm"], run["seed"]) for run in runs]
    if len(set(have)) != len(have):
        fail("some (arm, seed) has more than one run")
    if wanted and set(have) != wanted:
        lost = sorted(wanted - set(have))[:4]
        extra = sorted(set(have) - wanted)[:4]
        fail(f"runs do not match settings (missing {lost}, unexpected {extra})")
    return result


def load(path, experiment: str, expect: dict | None = None, run_keys: tuple = ()) -> dict:
    """Read and check the results file at ``path``.

    Args:
        path: the JSON file.
        experiment: the experiment it must hold.
        expect: settings the caller relies on (a nested dict, compared key by key with ``settings``); a
            difference is an error listing each differing key.
        run_keys: keys every run record must have.

    Raises:
        ResultsError: the file is missing, is not JSON, has another layout, holds another experiment, or
            was made with other settings than ``expect``.
    """
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"results file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"results file {path} is not valid JSON: {error}") from None
    validate(result, path, experiment, run_keys)
    if expect:
        diffs = _differences(result["settings"], expect)
        if diffs:
            raise ResultsError(f"results file {path} was made with other settings: " + "; ".join(diffs))
    return result


class Partial:
    """The finished units of an experiment in progress, in ``<out>.partial.jsonl``.

    The first line holds the settings' :func:`fingerprint`; each further line one finished unit
    ``{"key": ..., "records": [...]}``. Opening a file written for other settings is an error (remove it or
    rerun with the same options); a last line cut short by an interruption is ignored.
    """

    def __init__(self, out: Path, settings: dict):
        self.path = Path(str(out) + ".partial.jsonl")
        self.fingerprint = fingerprint(settings)  # without seeds: a run with more seeds reuses these
        self.done: dict[str, list] = {}
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            try:
                head = json.loads(lines[0]) if lines else {}
            except json.JSONDecodeError:
                head = {}
            if head.get("fingerprint") != self.fingerprint:
                raise ResultsError(f"partial results {self.path} were written for other settings "
                                   f"(fingerprint {head.get('fingerprint')!r}, now {self.fingerprint!r}); "
                                   "delete it or rerun with the options that wrote it")
            for line in lines[1:]:
                try:
                    unit = json.loads(line)
                except json.JSONDecodeError:  # cut short by an interruption: redo that unit
                    self._rewrite()
                    break
                self.done[unit["key"]] = unit["records"]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")

    def _rewrite(self) -> None:
        units = [json.dumps({"key": key, "records": records}) for key, records in self.done.items()]
        self.path.write_text("\n".join([json.dumps({"fingerprint": self.fingerprint}), *units]) + "\n")

    def add(self, key: str, records: list) -> None:
        """Record a finished unit (appended and flushed at once)."""
        self.done[key] = records
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "records": records}) + "\n")

    def remove(self) -> None:
        """Delete the file (once the results file is written)."""
        self.path.unlink(missing_ok=True)
