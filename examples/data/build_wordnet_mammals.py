"""Build ``mammal_closure.tsv``: the transitive closure of WordNet 3.0's noun hierarchy under mammal.n.01.

Run once, offline, from the WordNet 3.0 database files (Debian/Ubuntu: ``apt-get install wordnet-base``,
files under /usr/share/wordnet)::

    python examples/data/build_wordnet_mammals.py --wordnet-dir /usr/share/wordnet

The construction follows Nickel & Kiela, "Poincaré Embeddings for Learning Hierarchical
Representations" (NeurIPS 2017) and their ``transitive_closure.py``: an edge (u, v) means v is a
(transitive) hypernym of u, where a synset's hypernyms are its ``@`` (hypernym) and ``@i`` (instance
hypernym) pointers followed upwards; the mammal closure keeps every edge whose both ends are
``mammal.n.01`` or one of its transitive hyponyms, then drops the edges their ``mammals_filter.txt``
removes (as applied by their current code, ``re.match`` on ``"child ancestor"``, only the two
``^``-anchored patterns can match inside the mammal set: the out-of-taxonomy synsets ``tusker.n.01``
and ``female_mammal.n.01``); ``--no-filter`` keeps them. Synset names are NLTK's (``lemma.n.NN`` with the
sense number of the first lemma in ``index.noun``). Output: ``child<TAB>ancestor`` lines, sorted.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = "mammal.n.01"
# Children whose edges Nickel & Kiela's mammals_filter.txt removes inside the mammal closure.
FILTERED_CHILDREN = ("tusker.n.01", "female_mammal.n.01")


def read_sense_numbers(index_path: str) -> dict[tuple[str, str], int]:
    """(lemma lowercased, synset offset) → sense number, from ``index.noun``."""
    senses = {}
    with open(index_path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split()
            lemma, n_synsets, n_pointers = fields[0], int(fields[2]), int(fields[3])
            offsets = fields[6 + n_pointers:6 + n_pointers + n_synsets]
            for sense, offset in enumerate(offsets, start=1):
                senses[(lemma, offset)] = sense
    return senses


def read_noun_synsets(data_path: str):
    """offset → (first lemma, [hypernym offsets]) from ``data.noun`` (pointers ``@`` and ``@i``)."""
    synsets = {}
    with open(data_path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split(" | ")[0].split()
            offset, n_words = fields[0], int(fields[3], 16)
            first_lemma = fields[4]
            pos = 4 + 2 * n_words
            n_pointers = int(fields[pos])
            hypernyms = []
            for i in range(n_pointers):
                symbol, target, target_pos = fields[pos + 1 + 4 * i:pos + 4 + 4 * i]
                if symbol in ("@", "@i") and target_pos == "n":
                    hypernyms.append(target)
            synsets[offset] = (first_lemma, hypernyms)
    return synsets


def synset_names(synsets, senses) -> dict[str, str]:
    """offset → NLTK-style name ``lemma.n.NN``."""
    names = {}
    for offset, (lemma, _) in synsets.items():
        key = lemma.lower()
        # adjective markers like "(a)" never occur in nouns, but strip them defensively
        key = key.split("(")[0]
        names[offset] = f"{key}.n.{senses[(key, offset)]:02d}"
    return names


def ancestors(offset: str, synsets, cache: dict) -> frozenset:
    """All transitive hypernyms of a synset (memoised; WordNet's noun graph is a DAG)."""
    if offset not in cache:
        result = set()
        for parent in synsets[offset][1]:
            result.add(parent)
            result |= ancestors(parent, synsets, cache)
        cache[offset] = frozenset(result)
    return cache[offset]


def mammal_closure(wordnet_dir: str, nickel_kiela_filter: bool = True) -> list[tuple[str, str]]:
    synsets = read_noun_synsets(os.path.join(wordnet_dir, "data.noun"))
    names = synset_names(synsets, read_sense_numbers(os.path.join(wordnet_dir, "index.noun")))
    by_name = {name: offset for offset, name in names.items()}
    root = by_name[ROOT]
    sys.setrecursionlimit(10000)
    cache: dict = {}
    members = {o for o in synsets if root in ancestors(o, synsets, cache)} | {root}
    edges = {(names[o], names[a]) for o in members for a in ancestors(o, synsets, cache) if a in members}
    if nickel_kiela_filter:
        edges = {(child, ancestor) for child, ancestor in edges if child not in FILTERED_CHILDREN}
    return sorted(edges)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mammal_closure.tsv"))
    parser.add_argument("--no-filter", action="store_true", help="keep the edges Nickel & Kiela's filter drops")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.wordnet_dir, "data.noun")):
        sys.exit(f"no WordNet 3.0 database in {args.wordnet_dir!r} (install Debian's wordnet-base, "
                 "or pass --wordnet-dir to a directory holding data.noun and index.noun)")
    edges = mammal_closure(args.wordnet_dir, nickel_kiela_filter=not args.no_filter)
    nodes = {u for e in edges for u in e}
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("# WordNet 3.0 mammal.n.01 transitive closure (child<TAB>ancestor). WordNet 3.0 Copyright 2006 by "
                "Princeton University; see WORDNET_LICENSE next to this file.\n")
        for child, ancestor in edges:
            f.write(f"{child}\t{ancestor}\n")
    print(f"wrote {args.out}: {len(nodes)} nodes, {len(edges)} edges")


if __name__ == "__main__":
    main()
