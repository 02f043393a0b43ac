"""The A–E split of Voice2Mesh: test = VGGFace names whose first letter is A–E, train = F–Z.

The rule is applied to the VGGFace1 name of each VoxCeleb1 identity (column ``VGGFace1 ID`` of
``vox1_meta.csv``), case-insensitively, on the first alphabetic character of the name (for every
VoxCeleb1 name that is simply its first character, e.g. ``A.J._Buckley`` -> A -> test).

Frozen facts (measured on the VoxCeleb1 release's ``vox1_meta.csv``, 1,251 identities):

- 309 candidate test identities (A–E, id10001–id10309) and 942 train identities (F–Z);
- SHA-256 of the sorted A–E name list joined by ``"\\n"`` with a trailing ``"\\n"``:
  :data:`TEST_NAMES_SHA256`; of the F–Z list: :data:`TRAIN_NAMES_SHA256`;
- the paper's 301 / 924 are the identities with usable face fits (1,225 in all), a subset.

:func:`check_metadata` compares a user's metadata file with these facts.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import ValidationError

__all__ = [
    "TEST_LETTERS",
    "EXPECTED_TOTAL",
    "EXPECTED_TEST_COUNT",
    "EXPECTED_TRAIN_COUNT",
    "PAPER_TEST_COUNT",
    "PAPER_TRAIN_COUNT",
    "TEST_NAMES_SHA256",
    "TRAIN_NAMES_SHA256",
    "META_COLUMNS",
    "SplitCheck",
    "split_of",
    "split_names",
    "names_hash",
    "read_vox1_meta",
    "check_metadata",
]

TEST_LETTERS = "ABCDE"
EXPECTED_TOTAL = 1251
EXPECTED_TEST_COUNT = 309
EXPECTED_TRAIN_COUNT = 942
#: Identities with usable face fits in the paper (a subset of the candidates above).
PAPER_TEST_COUNT = 301
PAPER_TRAIN_COUNT = 924
TEST_NAMES_SHA256 = "1922cf625e89ab35223162e902014056581a84fb1398560db9a7300d1c79a994"
TRAIN_NAMES_SHA256 = "ab0fb709f9e29f0f4ecb863bcde7f031a4f3d484f29db019597fa558f08ecddc"

#: Columns of vox1_meta.csv; the first three are required.
META_COLUMNS = ("VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set")
_REQUIRED = META_COLUMNS[:3]


def _first_letter(name: str) -> str:
    for ch in str(name):
        if ch.isalpha():
            # "É" -> "E": decompose and keep the base letter
            return unicodedata.normalize("NFKD", ch)[0].upper()
    raise ValidationError(f"{name!r} has no letter; cannot place it in the A–E split", key="VGGFace1 ID")


def split_of(name: str) -> str:
    """``"test"`` if the name's first letter is A–E (case-insensitive), else ``"train"``.

    Parameters
    ----------
    name : str
        A VGGFace1 name, e.g. ``"A.J._Buckley"``.
    """
    return "test" if _first_letter(name) in TEST_LETTERS else "train"


def split_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split names into ``(test, train)``, each sorted (Python ``sorted``, i.e. by code point)."""
    test, train = [], []
    for name in names:
        (test if split_of(name) == "test" else train).append(str(name))
    return sorted(test), sorted(train)


def names_hash(names: Iterable[str]) -> str:
    """SHA-256 (hex) of the sorted names joined by ``"\\n"`` with a trailing ``"\\n"`` (UTF-8)."""
    text = "".join(f"{n}\n" for n in sorted(str(n) for n in names))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(col: str) -> str:
    return re.sub(r"\s+", " ", str(col).strip().strip('"').strip()).casefold()


def read_vox1_meta(path: str | os.PathLike):
    """Read VoxCeleb1's metadata table (``vox1_meta.csv``) as a pandas DataFrame.

    Tab- or comma-separated (detected from the header line), fields quoted or not, whitespace
    around fields and inside column names tolerated; values are stripped strings. Columns are
    renamed to :data:`META_COLUMNS` spelling (matched ignoring case and spacing).

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    pandas.DataFrame
        At least the columns ``VoxCeleb1 ID``, ``VGGFace1 ID``, ``Gender``; ``Nationality`` and
        ``Set`` when present; one row per identity.

    Raises
    ------
    ValidationError
        A required column is missing (the message names it and the file), a row is short, or a
        ``VoxCeleb1 ID`` / ``VGGFace1 ID`` repeats.
    """
    import pandas as pd

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValidationError(f"not UTF-8 text: {e}", path=path) from None
    lines = text.splitlines()
    header = next((ln for ln in lines if ln.strip()), None)
    if header is None:
        raise ValidationError("empty file", path=path)
    sep = "\t" if "\t" in header else ","
    try:
        df = pd.read_csv(
            io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True, skip_blank_lines=True
        )
    except (pd.errors.ParserError, ValueError) as e:
        raise ValidationError(f"cannot parse the table: {' '.join(str(e).split())}", path=path) from None
    wanted = {_canonical(c): c for c in META_COLUMNS}
    df = df.rename(columns={c: wanted.get(_canonical(c), str(c).strip()) for c in df.columns})
    for col in _REQUIRED:
        if col not in df.columns:
            found = ", ".join(repr(str(c)) for c in df.columns)
            raise ValidationError(f"missing column (found {found}; separator {sep!r})", path=path, key=col)
    df = df.apply(lambda s: s.astype(str).str.strip().str.strip('"').str.strip())
    for col in _REQUIRED:
        empty = df.index[df[col] == ""].tolist()
        if empty:
            raise ValidationError(f"empty value in data row {empty[0] + 1}", path=path, key=col)
    for col in _REQUIRED[:2]:
        dup = df[col][df[col].duplicated()].tolist()
        if dup:
            raise ValidationError(f"repeated value {dup[0]!r}", path=path, key=col)
    return df.reset_index(drop=True)


@dataclass(frozen=True)
class SplitCheck:
    """How a metadata table compares with the frozen A–E split.

    A hash cannot say which names differ, only whether the lists are identical; the counts say
    on which side the difference lies.
    """

    n_total: int
    n_test: int
    n_train: int
    test_hash: str
    train_hash: str
    source: str | None = None

    @property
    def test_hash_ok(self) -> bool:
        return self.test_hash == TEST_NAMES_SHA256

    @property
    def train_hash_ok(self) -> bool:
        return self.train_hash == TRAIN_NAMES_SHA256

    @property
    def counts_ok(self) -> bool:
        return (self.n_total, self.n_test, self.n_train) == (EXPECTED_TOTAL, EXPECTED_TEST_COUNT, EXPECTED_TRAIN_COUNT)

    @property
    def ok(self) -> bool:
        return self.counts_ok and self.test_hash_ok and self.train_hash_ok

    @property
    def differences(self) -> list[str]:
        """One line per difference from the frozen split (empty when it matches)."""
        out = []
        for what, got, want in (
            ("identities", self.n_total, EXPECTED_TOTAL),
            ("A–E (test) identities", self.n_test, EXPECTED_TEST_COUNT),
            ("F–Z (train) identities", self.n_train, EXPECTED_TRAIN_COUNT),
        ):
            if got != want:
                out.append(f"{got} {what}, expected {want} ({got - want:+d})")
        if not self.test_hash_ok:
            out.append(f"A–E name list differs (sha256 {self.test_hash[:12]}…, expected {TEST_NAMES_SHA256[:12]}…)")
        if not self.train_hash_ok:
            out.append(f"F–Z name list differs (sha256 {self.train_hash[:12]}…, expected {TRAIN_NAMES_SHA256[:12]}…)")
        return out

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        if self.ok:
            return f"{where}matches the frozen A–E split ({self.n_test} test / {self.n_train} train identities)"
        return where + "; ".join(self.differences)


def check_metadata(meta_or_path) -> SplitCheck:
    """Compare a VoxCeleb1 metadata table with the frozen A–E split.

    Parameters
    ----------
    meta_or_path : pandas.DataFrame, sequence of names, or path
        A table with a ``VGGFace1 ID`` column (as :func:`read_vox1_meta` returns), a list of
        VGGFace1 names, or the path of a metadata file.

    Returns
    -------
    SplitCheck
        Counts and hash matches; ``.ok`` is True when everything matches, ``.differences`` lists
        what does not.
    """
    source = None
    if isinstance(meta_or_path, (str, os.PathLike)):
        source = str(meta_or_path)
        meta_or_path = read_vox1_meta(meta_or_path)
    if hasattr(meta_or_path, "columns"):
        if "VGGFace1 ID" not in meta_or_path.columns:
            raise ValidationError("missing column", key="VGGFace1 ID")
        names = [str(n) for n in meta_or_path["VGGFace1 ID"].tolist()]
    else:
        names = [str(n) for n in meta_or_path]
    test, train = split_names(names)
    return SplitCheck(
        n_total=len(names),
        n_test=len(test),
        n_train=len(train),
        test_hash=names_hash(test),
        train_hash=names_hash(train),
        source=source,
    )
