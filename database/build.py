"""Build expkit's gene database from the Ensembl 98 tables in the shared data folder.

Usage (from the project root)::

    python database/build.py [--shared PATH] [--out DIR] [--chromosomes-only]

Reads ``<shared>/gene_annotation/hciRdata_{human98,mouse98,hugo,mgi}.tsv.gz`` and writes, under
``--out`` (default: the folder of this script)::

    hsa/genes.tsv.gz      human GRCh38 genes (Ensembl 98), one row per gene
    hsa/aliases.tsv.gz    HGNC previous / alias / newer symbols -> uid
    mmu/genes.tsv.gz      mouse GRCm38 genes (Ensembl 98)
    mmu/homologs.tsv.gz   mouse uid -> human uid (Ensembl 98 homolog column and MGI table)
    <taxa>/meta.json      release, assembly, counts and the sha256 of the inputs

The output is deterministic: rows are sorted, text is written with fixed formats and gzip runs with
``mtime=0`` and no file name, so a rebuild from the same inputs is byte-identical.
Only pandas and numpy are needed; expkit itself is not imported.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pandas as pd

RELEASE = "Ensembl 98"
TAXA = {
    "hsa": {"species": "Homo sapiens", "assembly": "GRCh38", "file": "hciRdata_human98.tsv.gz",
            "chromosomes": [str(i) for i in range(1, 23)] + ["X", "Y", "MT"]},
    "mmu": {"species": "Mus musculus", "assembly": "GRCm38", "file": "hciRdata_mouse98.tsv.gz",
            "chromosomes": [str(i) for i in range(1, 20)] + ["X", "Y", "MT"]},
}
GENE_COLUMNS = ["uid", "gene", "chromosome", "start", "end", "strand", "biotype", "assembly",
                "description", "mito", "ribo"]

# Ribosomal proteins, from the Ensembl/HGNC/MGI description of protein-coding genes:
# "ribosomal protein L3", "ribosomal protein S27a", "ribosomal protein L10-like", "ribosomal protein
# S4 Y-linked 1", "ribosomal protein lateral stalk subunit P0", "ribosomal protein, large, P0",
# "mitochondrial ribosomal protein L1", "39S ribosomal protein L23, mitochondrial", and the two
# ubiquitin fusions (FAU -> eS30, UBA52 -> eL40); tolerates MGI's "mitchondrial" typo (Mrps7).
# Mouse genes whose description does not say so (Fau) inherit the flag from their Ensembl 98 human
# homolog (protein-coding genes only). Kinases, binding proteins, pseudogenes, retrogenes
# and "novel protein similar to ..." do not match.
_RIBO = re.compile(
    r"^(?:mito?chondrial |[23]9S )?ribosomal protein,? (?:[LS]\d+[a-z]?\d*|SA|lateral stalk subunit P\d"
    r"|large,? P\d)(?:[ -]like(?: \d+)?)?(?:,? [XY]-linked(?: \d+)?)?(?:, mitochondrial)?$"
    r"|^(?:FAU ubiquitin like and ribosomal protein S30 fusion"
    r"|ubiquitin A-52 residue ribosomal protein fusion product 1)$",
    re.IGNORECASE,
)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_tsv(df: pd.DataFrame, path: Path) -> None:
    """Deterministic gzip TSV: '\\n' line ends, no index, gzip mtime 0, no embedded file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = df.to_csv(sep="\t", index=False, lineterminator="\n")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def genes_table(raw: pd.DataFrame, taxa: str, *, chromosomes_only: bool = False) -> pd.DataFrame:
    """The per-taxon gene table (primary assembly only), sorted by uid."""
    info = TAXA[taxa]
    df = raw.copy()
    # The hciRdata export holds the chromosomes plus the unlocalized/unplaced scaffolds of the primary
    # assembly (KI270*, GL000* / JH584*, GL456*); patches and haplotypes (CHR_*) are dropped here.
    keep = ~df["chromosome"].str.startswith("CHR_")
    if chromosomes_only:
        keep &= df["chromosome"].isin(info["chromosomes"])
    df = df[keep]
    if df["id"].duplicated().any():
        raise ValueError(f"{taxa}: duplicated Ensembl ids in {info['file']}")
    out = pd.DataFrame({
        "uid": df["id"].str.replace(r"\.\d+$", "", regex=True),
        "gene": df["gene_name"].where(df["gene_name"] != "", df["id"]),
        "chromosome": df["chromosome"],
        "start": df["start"].astype("int64"),
        "end": df["end"].astype("int64"),
        "strand": df["strand"].astype("int64"),
        "biotype": df["biotype"],
        "assembly": info["assembly"],
        "description": df["description"].str.replace(r"\s+", " ", regex=True).str.strip(),
    })
    out["mito"] = (out["chromosome"] == "MT").astype("int8")
    out["ribo"] = ((out["biotype"] == "protein_coding")
                   & out["description"].str.match(_RIBO)).astype("int8")
    return out.sort_values("uid", kind="mergesort").reset_index(drop=True)[GENE_COLUMNS]


def symbol_map(genes: pd.DataFrame) -> pd.Series:
    """symbol -> uid with the database's tie rule: protein_coding first, then a gene on a full
    chromosome (not a scaffold), then the lowest uid. Must match ``expkit.database``."""
    g = genes.assign(_pc=(genes["biotype"] != "protein_coding"),
                     _scaffold=~genes["chromosome"].str.fullmatch(r"\d+|X|Y|MT"))
    g = g.sort_values(["gene", "_pc", "_scaffold", "uid"], kind="mergesort")
    g = g.drop_duplicates("gene", keep="first")
    return pd.Series(g["uid"].to_numpy(), index=g["gene"].to_numpy())


def aliases_table(hugo: pd.DataFrame, genes: pd.DataFrame) -> pd.DataFrame:
    """HGNC synonyms -> uid.

    Each HGNC row is (current HGNC symbol, synonym, previous|alias). The HGNC symbol is placed on an
    Ensembl 98 gene by its own name, or, when HGNC renamed the gene after Ensembl 98, by one of its
    previous symbols that is an Ensembl 98 symbol (e.g. AARS1 -> AARS). The newer HGNC symbol is then
    itself kept as an alias of type ``hgnc``. Synonyms that are current Ensembl 98 symbols are dropped
    (a current symbol always wins in look-ups).
    """
    sym = symbol_map(genes)
    current = set(genes["gene"])
    hugo = hugo[(hugo["name"] != "") & (hugo["synonym"] != "")]
    uid_of = pd.Series(hugo["name"].map(sym).to_numpy(), index=hugo["name"].to_numpy())
    uid_of = uid_of[~uid_of.index.duplicated()]
    # renamed after Ensembl 98: resolve through previous symbols that Ensembl 98 still uses
    prev = hugo[(hugo["type"] == "previous") & hugo["synonym"].isin(current)
                & ~hugo["name"].isin(current)]
    prev = prev.assign(uid=prev["synonym"].map(sym))
    prev = prev.sort_values(["name", "uid"], kind="mergesort").drop_duplicates("name")
    uid_of.update(pd.Series(prev["uid"].to_numpy(), index=prev["name"].to_numpy()))
    rows = pd.concat([
        pd.DataFrame({"alias": hugo["synonym"], "uid": hugo["name"].map(uid_of), "type": hugo["type"]}),
        pd.DataFrame({"alias": uid_of.index, "uid": uid_of.to_numpy(), "type": "hgnc"}),
    ], ignore_index=True)
    rows = rows.dropna(subset=["uid"])
    rows = rows[~rows["alias"].isin(current)]
    order = {"hgnc": 0, "previous": 1, "alias": 2}
    rows = rows.assign(_t=rows["type"].map(order))
    rows = rows.sort_values(["alias", "uid", "_t"], kind="mergesort")
    rows = rows.drop_duplicates(["alias", "uid"], keep="first")
    return rows[["alias", "uid", "type"]].reset_index(drop=True)


def homologs_table(mouse_raw: pd.DataFrame, mgi: pd.DataFrame, mmu: pd.DataFrame, hsa: pd.DataFrame,
                   hsa_aliases: pd.DataFrame) -> pd.DataFrame:
    """Mouse uid -> human uid pairs from the Ensembl 98 ``human_homolog`` column and the MGI table.

    Human symbols resolve through current Ensembl 98 symbols, then HGNC aliases (newer symbols first);
    mouse MGI symbols through current Ensembl 98 mouse symbols.
    """
    hsym = symbol_map(hsa)
    al = hsa_aliases.assign(_t=hsa_aliases["type"].map({"hgnc": 0, "previous": 1, "alias": 2}))
    al = al.sort_values(["alias", "_t", "uid"], kind="mergesort").drop_duplicates("alias")
    hsym = pd.concat([hsym, pd.Series(al["uid"].to_numpy(), index=al["alias"].to_numpy())])
    hsym = hsym[~hsym.index.duplicated(keep="first")]
    msym = symbol_map(mmu)
    known = set(mmu["uid"])

    ens = mouse_raw[["id", "human_homolog"]].rename(columns={"id": "mmu", "human_homolog": "human"})
    ens = ens.assign(mmu=ens["mmu"].str.replace(r"\.\d+$", "", regex=True))
    ens = ens[ens["mmu"].isin(known)]
    ens = ens.assign(source="ensembl")
    m = mgi.assign(mmu=mgi["mouse"].map(msym), source="mgi")[["mmu", "human", "source"]]
    pairs = pd.concat([ens[["mmu", "human", "source"]], m], ignore_index=True)
    pairs = pairs[(pairs["human"] != "") & pairs["mmu"].notna()]
    pairs = pairs.assign(human=pairs["human"].str.split(",")).explode("human")
    pairs = pairs.assign(hsa=pairs["human"].str.strip().map(hsym)).dropna(subset=["hsa"])
    out = (pairs.groupby(["mmu", "hsa"], sort=True)["source"]
           .agg(lambda s: ",".join(sorted(set(s)))).reset_index())
    return out[["mmu", "hsa", "source"]]


def build(shared: Path, out: Path, *, chromosomes_only: bool = False) -> dict:
    ann = shared / "gene_annotation"
    paths = {k: ann / f"hciRdata_{k}.tsv.gz" for k in ("human98", "mouse98", "hugo", "mgi")}
    for p in paths.values():
        if not p.is_file():
            raise SystemExit(f"missing input {p}")
    human_raw, mouse_raw = _read(paths["human98"]), _read(paths["mouse98"])
    hsa = genes_table(human_raw, "hsa", chromosomes_only=chromosomes_only)
    mmu = genes_table(mouse_raw, "mmu", chromosomes_only=chromosomes_only)
    aliases = aliases_table(_read(paths["hugo"]), hsa)
    homologs = homologs_table(mouse_raw, _read(paths["mgi"]), mmu, hsa, aliases)
    ribo_hsa = set(hsa.loc[hsa["ribo"] == 1, "uid"])
    ens = homologs[homologs["source"].str.contains("ensembl")]
    via = set(ens.loc[ens["hsa"].isin(ribo_hsa), "mmu"])
    mmu["ribo"] = (mmu["ribo"].astype(bool)
                   | (mmu["uid"].isin(via) & (mmu["biotype"] == "protein_coding"))).astype("int8")

    _write_tsv(hsa, out / "hsa" / "genes.tsv.gz")
    _write_tsv(aliases, out / "hsa" / "aliases.tsv.gz")
    _write_tsv(mmu, out / "mmu" / "genes.tsv.gz")
    _write_tsv(homologs, out / "mmu" / "homologs.tsv.gz")
    summary = {}
    for taxa, genes, inputs in (("hsa", hsa, ("human98", "hugo")), ("mmu", mmu, ("mouse98", "mgi"))):
        meta = {
            "taxa": taxa, "species": TAXA[taxa]["species"], "assembly": TAXA[taxa]["assembly"],
            "release": RELEASE, "uid": "Ensembl gene id without version",
            "primary_assembly": "chromosomes only" if chromosomes_only
            else "chromosomes + unlocalized/unplaced scaffolds",
            "n_genes": int(len(genes)), "n_mito": int(genes["mito"].sum()),
            "n_ribo": int(genes["ribo"].sum()),
            "inputs": {paths[k].name: _sha256(paths[k]) for k in inputs},
        }
        if taxa == "hsa":
            meta["n_aliases"] = int(len(aliases))
        else:
            meta["n_homolog_pairs_hsa"] = int(len(homologs))
        _write_json(meta, out / taxa / "meta.json")
        summary[taxa] = meta
    return summary


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ.get("EXPKIT_SHARED_DATA", here.parent.parent / "shared" / "data"))
    parser.add_argument("--shared", type=Path, default=default,
                        help="the shared data folder holding gene_annotation/ "
                             "(default $EXPKIT_SHARED_DATA, else ../shared/data)")
    parser.add_argument("--out", type=Path, default=here, help="output folder (default: database/)")
    parser.add_argument("--chromosomes-only", action="store_true",
                        help="drop genes on unlocalized/unplaced scaffolds (keep 1-22/1-19, X, Y, MT)")
    args = parser.parse_args(argv)
    summary = build(args.shared, args.out, chromosomes_only=args.chromosomes_only)
    for taxa, meta in summary.items():
        extra = {k: v for k, v in meta.items() if k.startswith("n_")}
        print(f"{taxa} {meta['assembly']} {meta['release']}: {extra}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
