"""Reproducible low-data subsets: class lists, stratified fractions / per-class counts, holdouts.

Every selection depends only on (seed, the source's targets): each class draws from its own
`numpy.random.Generator(PCG64(...))` stream seeded with the seed, a purpose salt and the class's
label in the source, so the same arguments choose the same images in every run and process, and
a class's pick does not change when other classes are added or removed. Indices are returned
sorted so reading order follows the source's own order.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

from glsd_cli.data.base import ImageSource, SubsetSource
from glsd_cli.errors import DataError

# Different purposes use different streams so that, for one seed, a holdout is not simply the
# first images of the same permutation a subset uses.
_SALT_SUBSET, _SALT_HOLDOUT = 1, 2


def _rng(seed: int, salt: int, label: int) -> np.random.Generator:
    # Seed entropy must be non-negative: wrap the seed to 64 bits and shift labels (>= -1) by one.
    return np.random.Generator(np.random.PCG64([int(seed) % 2**64, salt, label + 1]))


def _by_class(targets: list[int]) -> dict[int, np.ndarray]:
    """Positions of each label (ascending), labels in ascending order."""
    arr = np.asarray(targets, dtype=np.int64)
    return {int(c): np.flatnonzero(arr == c) for c in np.unique(arr)}


def _proportional(sizes: list[int], total: int) -> list[int]:
    """Split `total` across groups in proportion to `sizes` (largest remainder, ties by order)."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    alloc = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - alloc[i]), i))
    for i in order[: total - sum(alloc)]:
        alloc[i] += 1
    return [min(a, s) for a, s in zip(alloc, sizes)]


def _check_one_mode(fraction: float | None, per_class: int | None, count: int | None) -> None:
    given = [name for name, v in (("fraction", fraction), ("per_class", per_class), ("count", count))
             if v is not None]
    if len(given) > 1:
        raise DataError(f"Give only one of fraction, per_class or count for a subset (got {', '.join(given)}).")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise DataError(f"Subset fraction {fraction} is out of range: expected a number in (0, 1].")
    if per_class is not None and per_class < 1:
        raise DataError(f"Subset per_class {per_class} is out of range: expected at least 1.")
    if count is not None and count < 1:
        raise DataError(f"Subset count {count} is out of range: expected at least 1.")


def _select_classes(source: ImageSource, classes: list[str]) -> tuple[list[int], dict[int, int], list[str]]:
    """Positions kept, old label -> new label map, and the new class list (in the given order)."""
    if not source.classes:
        raise DataError(f"Cannot select classes from '{source.uri}': it has no class names (unlabelled).")
    wanted = list(dict.fromkeys(c.strip() for c in classes if c.strip()))  # de-duplicate, keep order
    if not wanted:
        raise DataError("The class list is empty: expected at least one class name.")
    lookup = {name: i for i, name in enumerate(source.classes)}
    for name in wanted:
        if name not in lookup:
            close = difflib.get_close_matches(name, source.classes, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DataError(f"Unknown class '{name}' for '{source.uri}': expected one of its "
                            f"{len(source.classes)} class names.{hint}")
    label_map = {lookup[name]: new for new, name in enumerate(wanted)}
    keep = [i for i, t in enumerate(source.targets) if t in label_map]
    return keep, label_map, wanted


def make_subset(source: ImageSource, *, fraction: float | None = None, per_class: int | None = None,
                count: int | None = None, classes: list[str] | None = None, seed: int = 0) -> ImageSource:
    """Restrict `source` to `classes` (labels remapped to 0..n-1 in the given order), then pick a
    stratified `fraction` of each class (rounded, at least 1), `per_class` images per class (all of
    a smaller class), or `count` images split proportionally across classes. An unlabelled source
    is sampled uniformly. Returns a `SubsetSource` over `source` with sorted indices.
    """
    _check_one_mode(fraction, per_class, count)
    positions = list(range(len(source)))
    label_map: dict[int, int] | None = None
    new_classes: list[str] | None = None
    if classes is not None:
        positions, label_map, new_classes = _select_classes(source, classes)
    targets = [source.targets[i] for i in positions]  # labels as in the source (before remapping)
    if fraction is None and per_class is None and count is None:
        chosen = positions
    elif source.labelled or classes is not None:
        groups = _by_class(targets)
        sizes = [len(g) for g in groups.values()]
        if fraction is not None:
            want = [max(1, int(round(fraction * s))) for s in sizes]
        elif per_class is not None:
            want = [min(per_class, s) for s in sizes]
        else:
            if count > len(targets):  # type: ignore[operator]
                raise DataError(f"A subset of {count} images was asked for but '{source.uri}' has "
                                f"only {len(targets)}: expected at most {len(targets)}.")
            want = _proportional(sizes, count)  # type: ignore[arg-type]
        chosen = []
        for (label, where), k in zip(groups.items(), want):
            pick = _rng(seed, _SALT_SUBSET, label).permutation(len(where))[:k]
            chosen.extend(positions[j] for j in where[pick])
    else:
        if per_class is not None:
            raise DataError(f"per_class needs a labelled source, but '{source.uri}' is unlabelled: "
                            "use fraction or count.")
        n = len(positions)
        k = max(1, int(round(fraction * n))) if fraction is not None else int(count)  # type: ignore[arg-type]
        if k > n:
            raise DataError(f"A subset of {k} images was asked for but '{source.uri}' has only {n}: "
                            f"expected at most {n}.")
        pick = _rng(seed, _SALT_SUBSET, -1).permutation(n)[:k]
        chosen = [positions[j] for j in pick]
    return SubsetSource(source, sorted(chosen), label_map=label_map, classes=new_classes)


def split_holdout(source: ImageSource, fraction: float, seed: int = 0) -> tuple[ImageSource, ImageSource]:
    """Carve a seeded, stratified holdout (e.g. validation) set from a training source.

    Each class with at least two images gives round(fraction * size) images (at least one) to the
    holdout and keeps at least one for training; an unlabelled source is split uniformly.
    Returns (train, holdout) as disjoint `SubsetSource`s with sorted indices.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"Holdout fraction {fraction} is out of range: expected a number in (0, 1).")
    groups = _by_class(source.targets) if source.labelled else {-1: np.arange(len(source))}
    held: list[int] = []
    for label, where in groups.items():
        n = len(where)
        if n < 2:
            continue  # a single image stays in training: a class must be learnable
        k = min(n - 1, max(1, int(round(fraction * n))))
        held.extend(int(j) for j in where[_rng(seed, _SALT_HOLDOUT, label).permutation(n)[:k]])
    held_set = set(held)
    if not held_set:
        raise DataError(f"'{source.uri}' is too small to hold out a {fraction:.0%} split: "
                        "expected at least two images.")
    train = [i for i in range(len(source)) if i not in held_set]
    return SubsetSource(source, train), SubsetSource(source, sorted(held_set))


def read_class_file(path: str | Path) -> list[str]:
    """Class names, one per line; blank lines and `#` comments (whole-line or trailing) ignored."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Class file '{p}' does not exist: expected a text file with one class per line.")
    names = [line.split("#", 1)[0].strip() for line in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"Class file '{p}' lists no classes: expected one class name per line.")
    return names


def _root_index(source: ImageSource, index: int) -> tuple[ImageSource, int]:
    """Follow nested `SubsetSource`s down to the underlying source and its index."""
    while isinstance(source, SubsetSource):
        index = source.indices[index]
        source = source.base
    return source, index


def save_file_list(source: ImageSource, path: str | Path) -> None:
    """Record exactly which images a run uses: one tab-separated line per image with its index in
    the underlying source, its label as seen by the run, and its file path for folder sources."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# glsd file list: uri={source.uri} split={source.split} images={len(source)}",
             "# index\tlabel\tpath"]
    for i, label in enumerate(source.targets):
        base, j = _root_index(source, i)
        paths = getattr(base, "paths", None)  # FolderSource keeps its file paths
        line = f"{j}\t{label}"
        lines.append(f"{line}\t{paths[j]}" if paths is not None else line)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")


def restrict_to_run_subset(cfg, source: ImageSource) -> ImageSource:
    """`source` restricted to the subset a run's config selects (data.fraction / per_class / count /
    classes_file, seeded by data.subset_seed): the images the run trained on. `source` itself when the
    config selects none. `cfg` is a glsd Config."""
    d = cfg.data
    classes = read_class_file(d.classes_file) if d.classes_file else None
    if any(v is not None for v in (d.fraction, d.per_class, d.count, classes)):
        source = make_subset(source, fraction=d.fraction, per_class=d.per_class, count=d.count,
                             classes=classes, seed=d.subset_seed)
    return source
